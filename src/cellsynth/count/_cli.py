"""``cellsynth count``, ``cellsynth train-counter`` and ``cellsynth evaluate-counter``.

:func:`register` adds the three subcommands to an argparse subparsers object;
each sets ``func`` to a callable ``(args) -> int``. Results go to stdout
(one JSON object with ``--json``), progress bars to stderr.
"""

from __future__ import annotations

import json
from pathlib import Path

from typing import Optional

import numpy as np

from .. import io
from .._cli_types import add_marker_options, cell_diameter, diameter_or_auto, positive_float

__all__ = ["register"]


# the argument types live where a parser can import them without numpy; the names below are kept for callers
_positive_float, _cell_diameter, _diameter = positive_float, cell_diameter, diameter_or_auto


def check_scale(shape: tuple, diameter, model_diameter: float, *, what: str = "the image") -> None:
    """Refuse a cell diameter that makes no sense for an image plane, or whose rescaling cannot fit in memory.

    Counters rescale the image by ``model_diameter / diameter``; this runs before any allocation.

    Parameters
    ----------
    shape : tuple of int
        ``(rows, cols)`` of one plane.
    diameter : float, "auto" or None
        The diameter given (only numbers are checked).
    model_diameter : float
        The counter's training scale, or None for counters that do not rescale.

    Raises
    ------
    ValueError
        A diameter larger than twice the plane's longer side, or a rescaled plane that cannot fit.

    Examples
    --------
    >>> check_scale((64, 64), 500.0, 15.0)
    Traceback (most recent call last):
    ...
    ValueError: a cell diameter of 500 px does not fit the image (64x64 pixels); expected the diameter of one cell, at most 128 px
    """
    if not isinstance(diameter, (int, float)) or isinstance(diameter, bool):
        return
    rows, cols = (int(s) for s in shape[-2:])
    if diameter > 2 * max(rows, cols):
        raise ValueError(f"a cell diameter of {diameter:g} px does not fit {what} ({rows}x{cols} pixels); "
                         f"expected the diameter of one cell, at most {2 * max(rows, cols)} px")
    if model_diameter:
        factor = float(model_diameter) / float(diameter)
        # float32 copies of the plane at the model scale: input, density, blending weights, labels (~12 per pixel).
        io.require_memory(48.0 * rows * cols * factor * factor,
                          what=f"counting {what} ({rows}x{cols}) rescaled by {factor:.3g} to the model's scale "
                               f"(cells of {diameter:g} px to {float(model_diameter):g} px)",
                          hint="check --diameter (cell diameter in pixels), or count a crop")


def _plane_shape(image: np.ndarray, channel_axis) -> tuple:
    """``(rows, cols)`` of the planes the counter sees (the channel axis left out)."""
    if channel_axis is None and image.ndim >= 3 and image.shape[-1] <= 4:
        channel_axis = image.ndim - 1
    axes = [i for i in range(image.ndim) if channel_axis is None or i != channel_axis % image.ndim]
    return tuple(image.shape[i] for i in axes[-2:])


def register(subparsers) -> None:
    """Add ``count``, ``train-counter``, ``evaluate-counter`` and ``export-counter`` to ``subparsers``."""
    for add in (_register_count, _register_train, _register_evaluate, _register_export):
        add(subparsers)


def _register_count(subparsers) -> None:
    p = subparsers.add_parser("count", help="count cells in an image", description="Count cells in an image and print the count.")
    p.add_argument("image", nargs="?", default=None,
                   help="image file (TIFF, PNG, JPEG); stacks are counted plane by plane")
    p.add_argument("--from-provenance", default=None, metavar="FILE",
                   help="count again as a provenance file (written beside every --out) records: the same image "
                        "(checked by its SHA-256), model and settings give the same points")
    p.add_argument("--model", default=None,
                   help="'default', 'classic', a model folder/file or a bioimage.io .zip exported here "
                        "(default: the default_counter setting, see cellsynth settings; out of the box 'default')")
    p.add_argument("--diameter", type=_diameter, default="auto",
                   help="cell diameter in pixels, or 'auto' to estimate it from the image (default: auto)")
    p.add_argument("--channel", type=int, default=None, help="channel of a multichannel image (default: max over channels)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--tile", type=int, default=256, help="tile size in pixels (default 256)")
    p.add_argument("--overlap", type=int, default=None, help="tile overlap in pixels (default tile/8; 0: non-overlapping windows)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="tiles per forward pass (default: 2 on the CPU, 8 on a GPU)")
    p.add_argument("--out", default=None, help="write the points to this CSV (row, col[, plane], score)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--json", action="store_true", help="print one JSON object with count and points")
    p.add_argument("--regions", default=None, metavar="FILE",
                   help="count per region of interest too: napari's shapes CSV or GeoJSON (e.g. from QuPath); a "
                        "cell belongs to a region when the pixel holding its centre does")
    add_marker_options(p)
    p.add_argument("--exclude-border", action="store_true",
                   help="leave out nuclei cut by the image border (a disk of the diameter used reaching past the "
                        "edge); the output says how many")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_count)


def _register_train(subparsers) -> None:
    t = subparsers.add_parser("train-counter", help="train a cell counter",
                              description="Train a density or regression counter with one of the paper's strategies.")
    t.add_argument("train", nargs="?", default=None,
                   help="labelled images: dataset folder (manifest.json) or folder of images with points CSVs / label images")
    t.add_argument("--out", required=True, help="output folder (model.safetensors, config.json, checkpoint/)")
    t.add_argument("--synthetic", default=None, help="labelled synthetic dataset (finetune, dual, cutmix, pseudo-label)")
    t.add_argument("--unlabelled", default=None, help="folder of unlabelled real images (pseudo-label)")
    t.add_argument("--val", default=None, help="validation set (default: --val-fraction of the training images)")
    t.add_argument("--strategy", default="supervised", choices=["supervised", "finetune", "dual", "cutmix", "pseudo-label"],
                   help="supervised: labelled images only; finetune: --synthetic first, then TRAIN; dual: half "
                        "TRAIN, half --synthetic per batch; cutmix: dual batches mixed by CutMix (the paper's "
                        "'DACS + CutMix' row); pseudo-label: labelled crops plus --unlabelled crops labelled by an "
                        "EMA teacher and mixed by CutMix (default: supervised)")
    t.add_argument("--kind", default="density", choices=["density", "regression"])
    t.add_argument("--init", default=None, help="start from this counter ('default' or a model path)")
    t.add_argument("--backbone", default="efficientnet_b0")
    t.add_argument("--pretrained", default=None, metavar="imagenet|PATH",
                   help="initialise the backbone from ImageNet weights ('imagenet', downloaded once and cached, "
                        "or a local folder/file of timm weights), as in the paper (default: random)")
    t.add_argument("--epochs", type=int, default=50)
    t.add_argument("--pretrain-epochs", type=int, default=0, help="finetune: epochs on --synthetic first")
    t.add_argument("--steps-per-epoch", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--crop", type=int, default=256)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--lr-step", type=int, default=10, help="decay the learning rate x0.1 every N epochs (0: never)")
    t.add_argument("--val-fraction", type=float, default=0.2)
    t.add_argument("--cutmix-p", type=float, default=0.5)
    t.add_argument("--cutmix-alpha", type=float, default=1.0)
    t.add_argument("--diameter", type=_cell_diameter, default=None, help="cell diameter of the training images in pixels")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace a model or training run already in --out")
    t.add_argument("--json", action="store_true", help="print the history and best epoch as JSON")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=_train)


def _register_evaluate(subparsers) -> None:
    e = subparsers.add_parser("evaluate-counter", help="evaluate a counter on annotated images",
                              description="Count annotated images and print MAE, RMSE, ACP@5%% and ACP@10%%.")
    e.add_argument("dataset", help="dataset folder (manifest.json) or folder of annotated images")
    e.add_argument("--model", default="default", help="'default', 'classic' or a model path")
    e.add_argument("--diameter", type=_diameter, default="auto",
                   help="cell diameter of the images in pixels, or 'auto' to estimate it per image (default: auto)")
    e.add_argument("--device", default="auto")
    e.add_argument("--tile", type=int, default=256)
    e.add_argument("--overlap", type=int, default=None)
    e.add_argument("--json", action="store_true", help="print one JSON object (metrics and per-image counts)")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_evaluate)


def _register_export(subparsers) -> None:
    x = subparsers.add_parser("export-counter", help="export a counter as a bioimage.io model package",
                              description="Write a trained counter as a bioimage.io model package (.zip) that "
                                          "bioimageio.core and other bioimage.io tools run; the package is "
                                          "validated and tested with bioimageio.core before it is written.")
    x.add_argument("model", help="'default' or a counter folder/file")
    x.add_argument("--format", default="bioimageio", choices=["bioimageio"], help="package format (default: bioimageio)")
    x.add_argument("--out", required=True, help="the package file, PACKAGE.zip")
    x.add_argument("--name", default=None, help="model name in the package description")
    x.add_argument("--author", action="append", default=None, help="author name (repeatable; default: your login name)")
    x.add_argument("--license", default="BSD-3-Clause", help="SPDX licence id of the weights (default: BSD-3-Clause)")
    x.add_argument("--test-image", default=None,
                   help="image whose crop becomes the package's test input (default: a crop of the shipped nuclei sample)")
    x.add_argument("--no-torchscript", action="store_true", help="ship the state dict only")
    x.add_argument("--no-check", action="store_true", help="skip bioimageio.core's test run (validation still runs)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    x.add_argument("--json", action="store_true", help="print one JSON object with the package and test summary")
    x.set_defaults(func=_export)


def _progress(args):
    from ..progress import tqdm_callback

    return tqdm_callback(disable=bool(getattr(args, "quiet", False)))


def _count(args) -> int:
    from . import count_cells, provenance
    from .models import load_counter

    # 1. inputs, every one checked before counting
    recorded = _count_inputs(args)
    image, channel_axis = _read_count_image(args)
    plane = _plane_shape(image, channel_axis)
    header = io.read_tiff_header(args.image)
    regions, masks = _regions(args, plane)
    markers = _marker_plan(args, image, channel_axis, header)
    counter = load_counter(args.model, device=args.device)
    if recorded is not None:
        provenance.check_model(recorded, counter)
    if counter.kind != "classic" and counter.settings.rescale and image.ndim >= 2:
        check_scale(plane, args.diameter, counter.diameter, what=str(args.image))
    # 2. count
    cb, close = _progress(args)
    try:
        res = count_cells(image, counter=counter, diameter=args.diameter, channel=args.channel,
                          channel_axis=channel_axis, device=args.device, tile=args.tile, overlap=args.overlap,
                          batch_size=args.batch_size, progress=cb)
    finally:
        close()
    # 3. what is reported with the points: border, regions, marker classes, provenance
    extras = {"left_out_border": _exclude_border(res, plane) if args.exclude_border else None}
    features = {"score": res.scores, "source": np.array(["model"] * len(res.points), dtype=object)}
    if regions is not None:
        from .regions import count_in_regions, point_regions

        extras["regions"] = count_in_regions(res.points, regions, plane, pixel_size=header["pixel_size"],
                                             masks=masks)
        features["region"] = np.array(point_regions(res.points, regions, plane, masks=masks), dtype=object)
    if markers is not None:
        extras["markers"], per_point = _classify(markers, res)
        features.update(per_point)
    if args.out:
        features.update(_sizes(image, channel_axis, args.channel, res, header["pixel_size"]))
    record = provenance.count_record(args, counter, res, left_out=extras["left_out_border"],
                                     pixel_size=header["pixel_size"])
    # 4. write and print
    if args.out:
        # with a pixel size, the world columns are the positions in micrometres
        ps = header["pixel_size"]
        scale = (1.0,) * (res.points.shape[1] - 2) + (ps, ps) if ps else None
        io.write_points_csv(args.out, res.points, features=features, scale=scale, overwrite=args.overwrite)
        io.write_json(provenance.sidecar(args.out), record, overwrite=args.overwrite)
    if args.json:
        _print_count_json(res, extras, record)
    else:
        _print_count(res, extras)
    return 0


def _count_inputs(args):
    """Fill ``args`` from a provenance file and the settings, refuse outputs that exist; the record or None."""
    from . import provenance

    recorded = None
    if args.from_provenance:
        if args.image:
            raise ValueError("give an IMAGE or --from-provenance FILE, not both")
        recorded = provenance.apply(args, args.from_provenance)
    elif not args.image:
        raise ValueError("give the IMAGE to count (or --from-provenance FILE)")
    if args.model is None:
        from ..settings import load_settings

        args.model = load_settings().default_counter
    if args.out:
        io.prepare_output(args.out, overwrite=args.overwrite)
        io.prepare_output(provenance.sidecar(args.out), overwrite=args.overwrite)
    return recorded


def _read_count_image(args):
    from .data import read_image_axes

    image, channel_axis = read_image_axes(args.image)
    if image.ndim >= 2:
        check_scale(_plane_shape(image, channel_axis), args.diameter, None, what=str(args.image))
    return image, channel_axis


def _regions(args, plane: tuple):
    """``(regions, their masks)`` of ``--regions``, checked against the image; ``(None, None)`` without."""
    if not args.regions:
        return None, None
    from .regions import read_regions, region_masks

    regions = read_regions(args.regions)
    return regions, region_masks(regions, plane)


def _print_count_json(res, extras: dict, record: dict) -> None:
    doc = {
        "count": res.count,
        "density_sum": None if res.density_sum is None else round(res.density_sum, 3),
        "diameter": res.meta.get("diameter_used"),
        "diameter_source": res.meta.get("diameter_source"),
        "points": np.round(res.points, 3).tolist(),
        "scores": np.round(res.scores, 4).tolist(),
        "per_plane": res.per_plane.ravel().tolist(),
        "kind": res.meta.get("kind"),
        "model": res.meta.get("model"),
        "meta": res.meta,
    }
    doc.update({k: v for k, v in extras.items() if v is not None})
    doc["provenance"] = record
    if res.windows:
        doc["windows"] = [list(w) for w in res.windows]
    print(json.dumps(doc, default=io.json_default, allow_nan=False))


def _print_count(res, extras: dict) -> None:
    d = res.meta.get("diameter_used")
    scale = f"diameter {d:.1f} px ({res.meta.get('diameter_source')})" if d else str(res.meta.get("diameter_source"))
    left_out = extras.get("left_out_border")
    if res.meta.get("kind") == "regression":
        print(f"{res.count:.2f} (sum of window counts, no positions; {scale})")
    elif left_out:
        print(f"{res.count} cells ({scale}; {left_out} cut by the image border left out)")
    elif res.per_plane.size > 1:
        per = ", ".join(str(int(round(float(v)))) for v in res.per_plane.ravel())
        print(f"{res.count} cells in {res.per_plane.size} planes ({scale}; per plane: {per})")
    else:
        print(f"{res.count} cells ({scale})")
    for row in (extras.get("markers") or {}).get("classes", []):
        print(f"  {row['class']}: {row['count']} ({row['percent']:g} %)")
    for row in extras.get("regions") or []:
        density = f"{row['per_mm2']:g} per mm²" if "per_mm2" in row else f"{row['per_megapixel']:g} per megapixel"
        print(f"  {row['region']}: {row['count']} cells, {row['area_px']} px, {density}")


def _marker_plan(args, image, channel_axis, header: dict) -> Optional[dict]:
    """The channels to measure, their names and thresholds, checked against the image (None: no measuring)."""
    from .markers import marker_options

    chans, thresholds, names = marker_options(args.measure_channels, args.thresholds, args.marker_names)
    if not chans:
        return None
    if channel_axis is None:
        raise ValueError(f"{args.image} has one channel; --measure-channels needs an image with several channels")
    n = image.shape[channel_axis]
    if any(not 0 <= c < n for c in chans):
        raise ValueError(f"--measure-channels {args.measure_channels}: the image has channels 0..{n - 1}")
    if image.ndim != 3:
        raise ValueError(f"{args.image} is a stack; measuring channels works on one plane with channels")
    if names is None:
        known = header.get("channel_names") or []
        names = [known[c] if c < len(known) and known[c] else f"ch{c}" for c in chans]
    return {"channels": chans, "names": names, "thresholds": thresholds,
            "pixels": np.moveaxis(np.asarray(image), channel_axis, 0)[chans]}


def _classify(plan: dict, res) -> tuple[dict, dict]:
    """``(summary for the output, per-point columns for the CSV)`` of the marker classes of ``res``'s points."""
    from .markers import THRESHOLD_METHOD, auto_thresholds, class_counts, classify, nucleus_means

    d = float(res.meta.get("diameter_used") or 15.0)
    means = nucleus_means(plan["pixels"], res.points, diameter=d)
    auto = plan["thresholds"] is None
    thresholds = auto_thresholds(means) if auto else plan["thresholds"]
    classes = classify(means, thresholds, plan["names"])
    summary = {"channels": plan["channels"], "names": plan["names"],
               "thresholds": [round(float(t), 4) for t in thresholds],
               "threshold_method": THRESHOLD_METHOD if auto else "typed", "measured_within_px": d / 2,
               "classes": class_counts(list(classes), plan["names"])}
    columns = {f"mean_{n}": np.round(means[:, k], 4) for k, n in enumerate(plan["names"])}
    columns["class"] = classes
    return summary, columns


def _sizes(image, channel_axis, channel, res, pixel_size) -> dict:
    """``area_px`` (and ``area_um2`` with a pixel size) of each counted nucleus's object; NaN where it has none."""
    from .objects import nucleus_areas

    d = res.meta.get("diameter_used")
    if not d or not len(res.points):
        return {}
    area = nucleus_areas(image, res.points, diameter=float(d), channel=channel, channel_axis=channel_axis)
    out = {"area_px": np.round(area, 1)}
    if pixel_size:
        out["area_um2"] = np.round(area * float(pixel_size) ** 2, 3)
    return out


def _exclude_border(res, plane: tuple) -> int:
    """Drop the points of nuclei cut by the image border from ``res`` (in place); how many were dropped."""
    from .metrics import cut_by_border

    d = res.meta.get("diameter_used")
    if not d or not len(res.points):
        return 0
    cut = cut_by_border(res.points, plane, radius=0.5 * float(d))
    res.points, res.scores = res.points[~cut], res.scores[~cut]
    res.count = int(len(res.points))
    if res.per_plane.size > 1:
        per = np.zeros(res.per_plane.shape)
        lead = np.rint(res.points[:, : res.per_plane.ndim]).astype(int)
        np.add.at(per, tuple(lead.T), 1)
        res.per_plane = per
    else:
        res.per_plane = np.full(res.per_plane.shape, float(res.count))
    return int(cut.sum())


def _train(args) -> int:
    from . import TrainConfig, train_counter

    cfg = TrainConfig(
        kind=args.kind, strategy=args.strategy, backbone=args.backbone, epochs=args.epochs,
        pretrain_epochs=args.pretrain_epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
        crop=args.crop, lr=args.lr, lr_step=args.lr_step, val_fraction=args.val_fraction,
        cutmix_p=args.cutmix_p, cutmix_alpha=args.cutmix_alpha, seed=args.seed, pretrained=args.pretrained,
    )
    if args.train is None and args.synthetic is None:
        raise ValueError("give labelled training images (TRAIN) and/or --synthetic")
    for name in ("train", "synthetic", "unlabelled", "val"):
        v = getattr(args, name)
        if v is not None and not Path(v).exists():
            raise FileNotFoundError(f"--{name} path does not exist: {v}" if name != "train" else f"no such training data: {v}")
    cb, close = _progress(args)
    try:
        res = train_counter(args.train, synthetic=args.synthetic, unlabelled=args.unlabelled, val=args.val,
                            out=args.out, config=cfg, init=args.init, data_diameter=args.diameter,
                            device=args.device, resume=args.resume, overwrite=args.overwrite, progress=cb)
    finally:
        close()
    if args.json:
        print(json.dumps({"out": str(args.out), "best": res.best, "history": res.history}, default=io.json_default))
    else:
        for r in res.history:
            line = f"epoch {r['epoch']}: loss {r['loss']:.4f}"
            if "val_mae" in r:
                line += (f"  val MAE {r['val_mae']:.2f}  RMSE {r['val_rmse']:.2f}  "
                         f"ACP@5% {100 * r['val_acp5']:.1f}  ACP@10% {100 * r['val_acp10']:.1f}")
            print(line)
        print(f"saved to {args.out}")
    return 0


def _evaluate(args) -> int:
    from . import evaluate_counter

    cb, close = _progress(args)
    try:
        m = evaluate_counter(args.dataset, model=args.model, device=args.device,
                             diameter=args.diameter,
                             tile=args.tile, overlap=args.overlap, progress=cb)
    finally:
        close()
    if args.json:
        print(json.dumps(m, default=io.json_default))
    else:
        print(f"images {m['n']}")
        print(f"MAE {m['mae']:.3f}")
        print(f"RMSE {m['rmse']:.3f}")
        print(f"ACP@5% {100 * m['acp5']:.1f}")
        print(f"ACP@10% {100 * m['acp10']:.1f}")
    return 0


def _export(args) -> int:
    from .bioimageio import export_counter

    test_image = None
    if args.test_image is not None:
        from .data import read_image_axes
        from .preprocess import split_planes

        image, channel_axis = read_image_axes(args.test_image)
        test_image = split_planes(image, channel_axis=channel_axis)[0][0]
    try:
        res = export_counter(args.model, args.out, name=args.name, authors=args.author, licence=args.license,
                             test_image=test_image, torchscript=not args.no_torchscript, check=not args.no_check,
                             overwrite=args.overwrite)
    except ImportError as exc:
        raise ValueError(str(exc)) from exc
    if args.json:
        print(json.dumps({"out": str(res.path), "weight_formats": res.weight_formats, "notes": res.notes,
                          "test": res.test}, default=io.json_default))
    else:
        for note in res.notes:
            print(note)
        status = "not run" if res.test is None else res.test["status"]
        print(f"wrote {res.path} ({', '.join(res.weight_formats)}; bioimageio.core test: {status})")
    return 0
