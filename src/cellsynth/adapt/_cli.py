"""``cellsynth adapt-counter`` and ``cellsynth retrain-counter``.

Each prints a short summary (or one JSON object with ``--json``); progress bars
go to stderr. The report is also written beside the model (``adapt_report.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import io
from .._cli_types import diameter_or_auto as _diameter, positive_float as _positive_float

__all__ = ["register"]


def _common(p) -> None:
    p.add_argument("--out", required=True, help="output folder for the counter (model.safetensors, config.json, report)")
    p.add_argument("--base", default="default", help="counter to start from: 'default' or a model folder (default: default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(subparsers) -> None:
    """Add ``adapt-counter`` and ``retrain-counter`` to ``subparsers``."""
    a = subparsers.add_parser(
        "adapt-counter", help="adapt a counter to unlabelled images",
        description="Adapt a density counter to your images without labels: matched synthetic layouts stylized "
                    "like the images, fine-tuning with pseudo-labels, and a label-free check that keeps the base "
                    "counter when the adapted one is not better.")
    a.add_argument("images", nargs="+", metavar="IMAGE", help="unlabelled images of one kind (TIFF, PNG, JPEG)")
    a.add_argument("--diameter", type=_diameter, default="auto", help="nucleus diameter in pixels, or 'auto' (default)")
    a.add_argument("--minutes", type=_positive_float, default=3.0, help="time budget in minutes (default 3)")
    a.add_argument("--stylize", choices=["auto", "inst", "fast"], default="auto",
                   help="InST (needs Stable Diffusion weights and a GPU), fast (weights-free) or auto (default)")
    _common(a)
    a.set_defaults(func=_adapt)

    r = subparsers.add_parser(
        "retrain-counter", help="retrain a counter from corrected points",
        description="Retrain a density counter from corrected points. Give pairs IMAGE POINTS.csv (row,col columns, "
                    "as the points writer saves them). The loss counts only inside the --region boxes "
                    "(the whole images when none is given).")
    r.add_argument("pairs", nargs="+", metavar="IMAGE POINTS.csv", help="image and points CSV, repeated")
    r.add_argument("--region", nargs="+", action="append", default=None, metavar="R0 C0 R1 C1",
                   help="a checked box (end exclusive) as 4 numbers, optionally prefixed by the image number "
                        "(0-based, default 0): --region [I] R0 C0 R1 C1; repeat for more boxes")
    r.add_argument("--diameter", type=_diameter, default="auto",
                   help="nucleus diameter in pixels, or 'auto' (default)")
    r.add_argument("--minutes", type=_positive_float, default=2.0, help="time budget in minutes (default 2)")
    _common(r)
    r.set_defaults(func=_retrain)


def _progress(args):
    from ..progress import tqdm_callback

    return tqdm_callback(disable=bool(args.quiet))


def _read_images(paths):
    from ..count.data import read_image

    return [read_image(p) for p in paths]


def _summary(res, name: str) -> str:
    r = res.report
    lines = [f"{name}: {'accepted' if res.accepted else 'kept the base counter (the new one was not better)'}",
             f"diameter {r['diameter']['used']:.1f} px, working scale {r['working_scale']:.1f} px"]
    if "stylization" in r:
        lines.append(f"{r['n_layouts']} layouts, {r['stylization']} stylization")
    lines.append(f"training: {r['training']['steps']} steps in {r['training']['seconds']:.0f} s")
    before, after = r["score_before"], r["score_after"]
    key = "score" if "score" in before else "region_error"
    lines.append(f"check ({key}): before {before[key]:.3f}, after {after[key]:.3f}")
    if "decision" in r:
        lines.append(r["decision"])
    lines.append("counts before: " + " ".join(str(c) for c in res.counts_before))
    lines.append("counts after:  " + " ".join(str(c) for c in res.counts_after))
    if "note" in r:
        lines.append(r["note"])
    lines.append(f"saved to {res.path} in {r['seconds'].get('total', 0):.0f} s")
    return "\n".join(lines)


def _adapt(args) -> int:
    from . import adapt_counter

    images = _read_images(args.images)
    cb, close = _progress(args)
    try:
        res = adapt_counter(images, out=args.out, base=args.base, diameter=args.diameter, minutes=args.minutes,
                            stylize=args.stylize, seed=args.seed, device=args.device, progress=cb,
                            overwrite=args.overwrite)
    finally:
        close()
    _record_sources(args.out, res.report, list(args.images))
    print(json.dumps(res.report, default=io.json_default) if args.json else _summary(res, "adapt-counter"))
    return 0


def _parse_regions(groups, n_images: int):
    if not groups:
        return None
    regions: list = [None] * n_images
    for g in groups:
        if len(g) not in (4, 5):
            raise ValueError(f"--region takes 4 numbers (R0 C0 R1 C1) or 5 (I R0 C0 R1 C1), got {' '.join(g)!r}")
        try:
            vals = [float(v) for v in g]
        except ValueError:
            raise ValueError(f"--region values must be numbers, got {' '.join(g)!r}") from None
        i = int(vals[0]) if len(vals) == 5 else 0
        if len(vals) == 5 and (vals[0] != i or not 0 <= i < n_images):
            raise ValueError(f"--region image number must be in 0..{n_images - 1}, got {g[0]!r}")
        regions[i] = (regions[i] or []) + [tuple(vals[-4:])]
    return regions


def _retrain(args) -> int:
    from . import retrain_counter

    if len(args.pairs) % 2:
        raise ValueError(f"give IMAGE POINTS.csv pairs; got {len(args.pairs)} paths (an odd number)")
    img_paths, pts_paths = args.pairs[0::2], args.pairs[1::2]
    for p in pts_paths:
        if Path(p).suffix.lower() != ".csv":
            raise ValueError(f"expected a points CSV after each image, got {p!r}")
    images = _read_images(img_paths)
    points = []
    for p in pts_paths:
        pts, _ = io.read_points_csv(p)
        if pts.shape[1] != 2:
            raise ValueError(f"{p}: expected row,col points of a 2D image, got {pts.shape[1]} coordinates")
        points.append(pts)
    regions = _parse_regions(args.region, len(images))
    cb, close = _progress(args)
    try:
        res = retrain_counter(images, points, out=args.out, base=args.base, regions=regions, diameter=args.diameter,
                              minutes=args.minutes, seed=args.seed, device=args.device, progress=cb,
                              overwrite=args.overwrite)
    finally:
        close()
    _record_sources(args.out, res.report, [str(p) for p in args.pairs])
    print(json.dumps(res.report, default=io.json_default) if args.json else _summary(res, "retrain-counter"))
    return 0


def _record_sources(out, report: dict, sources: list) -> None:
    """The saved counter's provenance names the files it came from (the library saw their pixels only)."""
    from .._provenance import FOLDER_FILE, record, write_into

    if out is None or not (Path(out) / FOLDER_FILE).is_file() or not sources:
        return
    write_into(out, record(str(report.get("operation")), inputs=sources, model=report.get("base"),
                           parameters=report.get("params"),
                           result={"accepted": report.get("accepted"), "decision": report.get("decision")}))
