"""Retraining a density counter from a person's corrected points, counted only where they checked.

Steps of :func:`retrain_counter`:

1. check inputs (images, points, checked regions);
2. fit the counter's point settings (peak threshold, object split and keep
   rules, nucleus size) to the corrected points without training, kept only
   when they count held-out folds of the corrections better
   (:func:`~cellsynth.adapt.fit.fit_point_settings`);
3. choose the working scale as :func:`~cellsynth.adapt.adapt_counter` does and
   bring images, points and regions to it; density targets from the points and
   a loss mask of the checked regions (the whole image when none is given):
   outside them the loss is zero;
4. a small replay set of stylized synthetic layouts (against forgetting), a few
   of them held out;
5. hold out a strip of the checked regions for validation (the last quarter of
   each box's longer side, when that strip is at least two nuclei wide): the
   points there are not trained on;
6. count and score the base: the count error in the validation strips as
   counting gives it (points after reconciliation with the foreground objects,
   plus a quarter of the density-sum error to break ties), and the error on
   held-out synthetic layouts;
7. fine-tune a copy of the base on crops placed over the training part of the
   checked regions, mixed with replay crops, for the time budget, with the
   BatchNorm statistics of the base kept; score it on the validation strips at
   each quarter of the budget and keep the best state (early stopping);
8. keep the new network when it counts the validation strips better than the
   base's network (with the fitted settings) and its held-out synthetic error did
   not grow much; else the base's network with the fitted settings when they were
   kept, else the base itself (``accepted=False``). A network is kept only on
   evidence: strips holding at least :data:`WEAK_VALIDATION` annotated cells
   (checked boxes too small to split, or too few cells, keep the base's
   network, and the decision says why);
9. count with the kept counter, write the report and the counter.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..count.counter import CounterConfig
from ..progress import ProgressCallback, report
from ._output import REPORT_FILE, check_out
from ._train import Item, crop_item, finetune, forward_density, make_item, peak_count, stack_batch, working_scale
from .adapt import (AdaptParams, AdaptResult, check_budget, check_images, count_images, finish, load_base,
                    working_planes)
from .fast_style import matched_layouts
from .fit import FitResult, fit_point_settings
from .stats import combine_stats, estimate_image_stats

__all__ = ["retrain_counter", "region_mask", "region_error", "split_validation", "validation_error"]


def _check_points(points, shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    n = len(shapes)
    if isinstance(points, np.ndarray) or not isinstance(points, Sequence) or len(points) != n:
        raise ValueError(f"points must be a sequence of {n} arrays of shape (K, 2), one per image")
    out = []
    for i, (pts, shape) in enumerate(zip(points, shapes)):
        a = np.asarray(pts, dtype=float)
        if a.size == 0:
            a = np.zeros((0, 2))
        if a.ndim != 2 or a.shape[1] != 2:
            raise ValueError(f"points[{i}] must have shape (K, 2) as (row, col), got {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"points[{i}] contains NaN or infinite values")
        off = (a < -0.5).any(axis=1) | (a[:, 0] > shape[0] - 0.5) | (a[:, 1] > shape[1] - 0.5)
        if off.any():
            r, c = a[np.flatnonzero(off)[0]]
            raise ValueError(f"points[{i}]: {int(off.sum())} of {len(a)} points lie outside the image of "
                             f"{shape[0]}x{shape[1]} pixels (e.g. row {r:.6g}, col {c:.6g}); expected (row, col) "
                             "pixel coordinates of this image")
        out.append(a)
    return out


def _check_regions(regions, shapes: list[tuple[int, int]]) -> list[Optional[list[tuple[int, int, int, int]]]]:
    if regions is None:
        return [None] * len(shapes)
    if not isinstance(regions, Sequence) or len(regions) != len(shapes):
        raise ValueError(f"regions must be None or a sequence of {len(shapes)} entries (a list of boxes or None per image)")
    out = []
    for i, (boxes, shape) in enumerate(zip(regions, shapes)):
        if boxes is None:
            out.append(None)
            continue
        checked = []
        for box in boxes:
            b = np.asarray(box, dtype=float).ravel()
            if b.size != 4 or not np.all(np.isfinite(b)):
                raise ValueError(f"regions[{i}] box {box!r} must be (row0, col0, row1, col1)")
            if b[0] < 0 or b[1] < 0 or b[2] > shape[0] or b[3] > shape[1]:
                raise ValueError(f"regions[{i}] box {tuple(float(v) for v in b)} reaches outside the image of "
                                 f"{shape[0]}x{shape[1]} pixels; expected 0 <= row0 < row1 <= {shape[0]} and "
                                 f"0 <= col0 < col1 <= {shape[1]}")
            r0, c0 = int(np.floor(b[0])), int(np.floor(b[1]))
            r1, c1 = int(np.ceil(b[2])), int(np.ceil(b[3]))
            if r1 <= r0 or c1 <= c0:
                raise ValueError(f"regions[{i}] box {box!r} is empty inside the image of shape {shape}; "
                                 "expected row0 < row1 and col0 < col1 overlapping the image")
            checked.append((r0, c0, r1, c1))
        if not checked:
            raise ValueError(f"regions[{i}] is an empty list; give boxes, or None for the whole image")
        out.append(checked)
    return out


def region_mask(shape: tuple[int, int], boxes, factor: float = 1.0) -> np.ndarray:
    """1 inside the boxes (scaled by ``factor``), 0 elsewhere.

    Examples
    --------
    >>> float(region_mask((4, 6), [(0, 0, 2, 3)]).sum())
    6.0
    """
    m = np.zeros(shape, np.float32)
    for r0, c0, r1, c1 in boxes:
        m[int(np.floor(r0 * factor)):int(np.ceil(r1 * factor)), int(np.floor(c0 * factor)):int(np.ceil(c1 * factor))] = 1
    return m


def _scaled_boxes(boxes, factor: float, shape) -> list[tuple[int, int, int, int]]:
    return [(int(np.floor(r0 * factor)), int(np.floor(c0 * factor)),
             min(shape[0], int(np.ceil(r1 * factor))), min(shape[1], int(np.ceil(c1 * factor)))) for r0, c0, r1, c1 in boxes]


def region_error(net, config: dict, items: Sequence[Item], device) -> dict:
    """Point-count error of ``net`` inside the checked regions (whole images without a mask).

    Returns ``error`` (sum of absolute count differences per image over the
    sum of true counts) and ``counts`` (predicted, true) per image.
    """
    scale = CounterConfig.of(config).density_scale
    err, tot, pairs = 0.0, 0, []
    for it in items:
        d = forward_density(net, it.image, scale=scale, device=device, stride=int(getattr(net, "stride", 16)))
        pts, _ = peak_count(d, config)
        m = it.mask if it.mask is not None else np.ones(it.image.shape, np.float32)

        def inside(c):
            if len(c) == 0:
                return 0
            r = np.clip(np.floor(c[:, 0]).astype(int), 0, m.shape[0] - 1)
            k = np.clip(np.floor(c[:, 1]).astype(int), 0, m.shape[1] - 1)
            return int((m[r, k] > 0).sum())

        n_pred, n_true = inside(pts), inside(it.centres)
        err += abs(n_pred - n_true)
        tot += n_true
        pairs.append((n_pred, n_true))
    return {"error": float(err / max(tot, 1)), "counts": pairs}


def split_validation(boxes, min_side: float, share: float = 0.25, gap: int = 0):
    """Training and validation parts of checked boxes: the last ``share`` of each box's longer side is held out.

    ``gap`` pixels between the two parts belong to neither, so that the density
    target of a held-out cell near the cut never reaches the training part. A
    box is split only when both parts are at least ``min_side`` pixels wide;
    otherwise it is used whole for training.

    Examples
    --------
    >>> split_validation([(0, 0, 100, 200), (0, 0, 20, 20)], min_side=30, gap=5)
    ([(0, 0, 100, 145), (0, 0, 20, 20)], [(0, 150, 100, 200)])
    """
    train, val = [], []
    for r0, c0, r1, c1 in boxes:
        wide = c1 - c0 >= r1 - r0
        lo, hi = (c0, c1) if wide else (r0, r1)
        cut = hi - int(round((hi - lo) * share))
        if hi - cut >= min_side and cut - gap - lo >= min_side:
            if wide:
                train.append((r0, c0, r1, cut - gap))
                val.append((r0, cut, r1, c1))
            else:
                train.append((r0, c0, cut - gap, c1))
                val.append((cut, c0, r1, c1))
        else:
            train.append((r0, c0, r1, c1))
    return train, val


def _inside(points: np.ndarray, mask: np.ndarray) -> np.ndarray:
    pts = np.asarray(points, float).reshape(-1, 2)
    r = np.clip(np.floor(pts[:, 0] + 0.5).astype(int), 0, mask.shape[0] - 1)
    c = np.clip(np.floor(pts[:, 1] + 0.5).astype(int), 0, mask.shape[1] - 1)
    return mask[r, c] > 0


def validation_error(counter, images, points, val_boxes, diameter: float) -> dict:
    """Count error in the validation boxes as :func:`~cellsynth.count.count_cells` counts the whole images.

    ``error``: summed absolute point-count differences over the summed true
    counts; ``density_error``: the same for the density sum; ``score``:
    ``error + 0.25 * density_error``; ``n_true``: true cells in the boxes.
    """
    from ..count.infer import count_cells

    err = derr = 0.0
    tot = 0
    for im, pts, vb in zip(images, points, val_boxes):
        if not vb:
            continue
        res = count_cells(im, counter=counter, diameter=diameter, engine="torch")
        mask = region_mask(res.density.shape, vb)
        n_true = int(_inside(pts, mask).sum())
        err += abs(int(_inside(res.points, mask).sum()) - n_true)
        derr += abs(float((res.density * mask).sum(dtype=np.float64)) - n_true)
        tot += n_true
    tot_ = max(tot, 1)
    return {"error": err / tot_, "density_error": derr / tot_, "score": (err + 0.25 * derr) / tot_, "n_true": tot}


#: A retrained network is kept only when the held-out strips hold at least this many annotated cells.
WEAK_VALIDATION = 10


def _fit_settings(counter, planes, points, boxes, diameter, progress) -> FitResult:
    """:func:`~cellsynth.adapt.fit.fit_point_settings` for density counters; other kinds keep their settings."""
    if counter.kind == "density":
        return fit_point_settings(counter, planes, points, boxes, diameter, progress=progress)
    own = {}
    return FitResult(settings=own, base=own, accepted=False, cv_loss=0.0, base_cv_loss=0.0,
                     config=copy.deepcopy(counter.config))


def _settings_line(fit: FitResult) -> str:
    if not fit.base:
        return "point settings: none to fit for this kind of counter"
    changed = {k: v for k, v in fit.settings.items() if v != fit.base[k]}
    loss = f"held-out loss {fit.base_cv_loss:.3f} with the base's, {fit.cv_loss:.3f} fitted"
    if not fit.accepted:
        return f"point settings kept ({loss})"
    return "point settings fitted: " + ", ".join(f"{k} {fit.base[k]:g} -> {v:g}" for k, v in changed.items()) + \
        f" ({loss})"


def _decision(accepted: bool, validate: bool, before: dict, after: dict, fit: Optional[FitResult] = None) -> str:
    """One line a person can judge: what was decided, on what evidence, with the numbers.

    ``accepted``: whether the retrained network was kept; ``fit``: the point settings fitted before.
    """
    line = _network_line(accepted, validate, before, after)
    if fit is None:
        return line.replace("retrained network kept", "accepted").replace("retrained network not kept", "kept the base")
    verdict = "accepted" if (accepted or fit.accepted) else "kept the base"
    return f"{verdict}: {_settings_line(fit)}; {line}"


def _network_line(accepted: bool, validate: bool, before: dict, after: dict) -> str:
    verdict = "retrained network kept" if accepted else "retrained network not kept"
    if validate:
        n = int(before["validation"]["n_true"])
        e0, e1 = before["validation"]["error"], after["validation"]["error"]
        why = (f"count error in the held-out strip ({n} annotated cells) {100 * e0:.1f} % with the base, "
               f"{100 * e1:.1f} % with the retrained counter")
        if n < WEAK_VALIDATION:
            why += (f"; too few to show a gain: a retrained network needs at least {WEAK_VALIDATION} held-out cells "
                    "(correct a larger region or more images)")
    else:
        why = (f"no region large enough to hold out a strip (error in the trained regions "
               f"{100 * before['region_error']:.1f} % -> {100 * after['region_error']:.1f} %, which cannot show "
               "over-fitting); correct a larger region or more images")
    if after["synthetic_error"] > max(1.5 * before["synthetic_error"], before["synthetic_error"] + 0.05):
        why += (f"; it counts held-out synthetic layouts worse ({100 * before['synthetic_error']:.1f} % -> "
                f"{100 * after['synthetic_error']:.1f} %)")
    return f"{verdict}: {why}"


def _synthetic_error(net, config, holdout, device) -> float:
    return region_error(net, config, [make_item(img, cen, config) for img, cen in holdout], device)["error"]


def _retrain_sampler(user: list[Item], boxes: list, replay: list[Item], p: AdaptParams):
    n_replay = int(round(p.batch_size * p.replay_share)) if replay else 0
    weights = np.array([sum((b[2] - b[0]) * (b[3] - b[1]) for b in bx) for bx in boxes], float)
    weights = weights / weights.sum()

    def sample(rng: np.random.Generator, teacher):
        parts = []
        for _ in range(p.batch_size - n_replay):
            i = int(rng.choice(len(user), p=weights))
            box = boxes[i][int(rng.integers(0, len(boxes[i])))]
            parts.append(crop_item(user[i], p.crop, rng, box=box))
        for _ in range(n_replay):
            parts.append(crop_item(replay[int(rng.integers(0, len(replay)))], p.crop, rng))
        return stack_batch(parts)

    return sample


def retrain_counter(
    images: Sequence[np.ndarray],
    points: Sequence[np.ndarray],
    *,
    out: Union[str, os.PathLike, None],
    base: Any = "default",
    regions: Optional[Sequence[Optional[Sequence[tuple]]]] = None,
    diameter: Union[float, str, None] = "auto",
    minutes: float = 2.0,
    seed: int = 0,
    device: Any = "auto",
    progress: Optional[ProgressCallback] = None,
    overwrite: bool = False,
    params: Optional[AdaptParams] = None,
) -> AdaptResult:
    """Retrain a density counter from corrected points, counting the loss only in checked regions.

    Parameters
    ----------
    images : sequence of ndarray
        2D images (or one-plane multichannel images).
    points : sequence of ndarray of shape (K, 2)
        All cell centres ``(row, col)`` of each image, as corrected by a person
        (at least inside the checked regions).
    out : path-like or None
        Folder for the counter and ``adapt_report.json``, written atomically at the end.
    base : str, path-like or Counter
        Counter to start from (``"default"``, or e.g. an adapted one).
    regions : sequence of (sequence of (row0, col0, row1, col1)) or None
        Per image, the boxes a person checked (end exclusive), or None for the
        whole image; None: every image is checked everywhere. Outside them the
        loss is zero.
    diameter : float, "auto" or None
        Nucleus diameter in pixels; ``"auto"`` estimates it; None: the images are
        at the base's scale already.
    minutes : float
        Wall-time budget.
    seed : int
    device : str or torch.device
    progress : ProgressCallback, optional
        Stages ``"count before"``, ``"train"``, ``"check"``, ``"count after"``;
        may raise ``Cancelled`` (then nothing is written).
    overwrite : bool
    params : AdaptParams, optional

    Returns
    -------
    AdaptResult

    Raises
    ------
    ValueError, TypeError
        Mismatched images, points or regions; bad settings.
    FileExistsError
        ``out`` is not empty and ``overwrite`` is False.
    """
    from ..count.preprocess import split_planes
    from ..device import resolve_device

    t_start = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(name: str, t: float) -> float:
        now = time.perf_counter()
        seconds[name] = round(now - t, 2)
        return now

    # 1. check inputs
    p = params or AdaptParams()
    if not isinstance(p, AdaptParams):
        raise TypeError(f"params must be an AdaptParams, got {type(p).__name__}")
    imgs = check_images(images)
    flat = []
    for i, im in enumerate(imgs):
        planes, _ = split_planes(im)
        if len(planes) != 1:
            raise ValueError(f"images[{i}] is a stack of {len(planes)} planes; retraining takes 2D images")
        flat.append(planes[0])
    shapes = [pl.shape for pl in flat]
    pts = _check_points(points, shapes)
    boxes = _check_regions(regions, shapes)
    check_budget(minutes, seed)
    out = check_out(out, overwrite)
    dev = resolve_device(device)
    t = time.perf_counter()

    # 2. scale
    base_counter = load_base(base, dev)
    if diameter is None:
        d_user = base_counter.diameter
        per_image = []
    else:
        per_image = [estimate_image_stats(im, diameter=diameter) for im in imgs]
        d_user = combine_stats(per_image)["diameter"]
    checked = [[(0, 0, sh[0], sh[1])] if bx is None else bx for bx, sh in zip(boxes, shapes)]
    t = lap("prepare", t)

    # 3. the point settings fitted to the corrections (the network unchanged), judged by cross-validation
    fit = _fit_settings(base_counter, flat, pts, checked, d_user, progress)
    t = lap("fit_settings", t)
    d_eff = d_user * CounterConfig.of(fit.config).diameter_scale  # the nuclei as the fitted settings see them
    s = working_scale(d_eff, base_counter.diameter, p.span)
    factor = s / d_eff
    config = copy.deepcopy(fit.config)
    base_training = config.pop("training", None)
    config.pop("dtype", None)
    config.update(diameter=s, name="retrained")


    # 4. validation strips, targets and masks at the working scale
    gap = int(np.ceil((4.0 * CounterConfig.of(config).sigma + 2.0) / factor))  # the reach of a target's density
    split = [split_validation(bx, min_side=2.0 * d_user, gap=gap) for bx in checked]
    train_boxes, val_boxes = [sp[0] for sp in split], [sp[1] for sp in split]
    planes = working_planes(imgs, config, factor)
    user, work_boxes = [], []
    for pl, c, tb, vb, bx in zip(planes, pts, train_boxes, val_boxes, boxes):
        cw = (c + 0.5) * factor - 0.5
        mask = None if (bx is None and not vb) else region_mask(pl.shape, tb, factor)
        user.append(make_item(pl, cw, config, mask))
        work_boxes.append(_scaled_boxes(tb, factor, pl.shape))
    t = lap("targets", t)

    # 4. replay layouts like the images
    stats = {"diameter": d_user, "foreground_fraction": float(np.mean([st["foreground_fraction"] for st in per_image]))
             if per_image else 0.15}
    n_replay = max(1, p.n_layouts // 2)
    lays = matched_layouts(stats, n_replay + p.n_holdout, shape=(p.layout_size, p.layout_size), scale=factor,
                           references=planes, rng=seed)
    replay = [make_item(img, cen, config) for img, cen in lays[:n_replay]]
    holdout = lays[n_replay:]
    t = lap("layouts", t)

    # 5. base
    counts_before = count_images(imgs, base_counter, d_user, progress, "count before")
    t = lap("count_before", t)
    from ..count.models import Counter, to_device

    base_net = copy.deepcopy(base_counter.net).float().to(dev).eval()
    net = copy.deepcopy(base_net)
    # the candidate as counting runs it (points reconciled with objects), sharing the training network
    live = to_device(Counter(kind="density", name="retrained", config=copy.deepcopy(config), net=net), dev)
    validate = any(val_boxes)

    def val_score(counter) -> dict:
        return validation_error(counter, imgs, pts, val_boxes, d_user)

    before = {"region_error": region_error(base_net, config, user, dev)["error"],
              "synthetic_error": _synthetic_error(base_net, config, holdout, dev)}
    if validate:
        before["validation"] = val_score(live)
        validate = before["validation"]["n_true"] > 0
    report(progress, "check", 1, 2, "base scored")
    t = lap("check_before", t)

    # 7. fine-tune, keeping the state that counts the validation strips best
    best = {"step": 0, "score": before["validation"]["score"] if validate else None, "state": None}
    history: list[dict] = []

    def on_check(trained, step: int) -> None:
        v = val_score(live)
        history.append({"step": int(step), **v})
        if v["score"] < best["score"] - 1e-9:
            best.update(step=int(step), score=v["score"],
                        state={k: x.detach().clone() for k, x in trained.state_dict().items()})

    reserve = 2.0 * (seconds["count_before"] + seconds["check_before"]) + 5.0
    train_seconds = max(0.0, minutes * 60.0 - (time.perf_counter() - t_start) - reserve)
    net, info = finetune(net, _retrain_sampler(user, work_boxes, replay, p), seconds=train_seconds,
                         max_steps=p.max_steps, min_steps=p.min_steps, lr=p.lr,
                         scale=CounterConfig.of(config).density_scale, device=dev, seed=seed, progress=progress,
                         freeze_bn=True, checks=4 if validate else 0, on_check=on_check if validate else None)
    if validate and best["state"] is not None:
        net.load_state_dict(best["state"])
    info["validation"] = history
    info["best_step"] = best["step"]
    t = lap("train", t)

    # 8. check
    after = {"region_error": region_error(net, config, user, dev)["error"],
             "synthetic_error": _synthetic_error(net, config, holdout, dev)}
    synthetic_ok = after["synthetic_error"] <= max(1.5 * before["synthetic_error"], before["synthetic_error"] + 0.05)
    if validate:
        after["validation"] = val_score(live)
        enough = before["validation"]["n_true"] >= WEAK_VALIDATION
        tuned = bool(best["state"] is not None and synthetic_ok and enough)
    else:
        tuned = False  # nothing held out: a gain cannot be told from over-fitting
    rule = (f"validation strips (at least {WEAK_VALIDATION} annotated cells) counted better than by the base, "
            "held-out synthetic layouts not much worse")
    accepted = tuned or fit.accepted
    report(progress, "check", 2, 2, "accepted" if accepted else "kept the base")
    t = lap("check_after", t)

    # 9. counts, report, write
    if not tuned:  # the base's network with the fitted point settings (the base itself when they were not kept)
        config, net = copy.deepcopy(fit.config), copy.deepcopy(base_net)
        config.pop("training", None)
        config.pop("dtype", None)
        config["name"] = "retrained"
    candidate = to_device(Counter(kind="density", name="retrained", config=copy.deepcopy(config),
                                  net=copy.deepcopy(net)), dev)
    if accepted:
        counts_after = count_images(imgs, candidate, d_user, progress, "count after")
    else:
        counts_after = list(counts_before)
    t = lap("count_after", t)
    doc = {
        "operation": "retrain-counter",
        "accepted": accepted,
        "base": base_counter.describe(),
        "base_training": base_training,
        "n_images": len(imgs),
        "n_points": [int(len(c)) for c in pts],
        "regions": [None if b is None else [list(x) for x in b] for b in boxes],
        "validation_regions": [[list(x) for x in vb] for vb in val_boxes],
        "acceptance": f"network: {rule}; point settings: held-out folds of the corrections counted better",
        "point_settings": fit.to_dict(),
        "network_accepted": tuned,
        "diameter": {"used": d_user, "given": diameter if not isinstance(diameter, str) else None,
                     "per_image": [st["diameter"] for st in per_image]},
        "working_scale": s,
        "scale_factor": factor,
        "n_replay": len(replay),
        "n_holdout": len(holdout),
        "training": info,
        "score_before": before,
        "score_after": after,
        "counts_before": counts_before,
        "counts_after": counts_after,
        "params": p.to_dict(),
        "minutes": float(minutes),
        "seed": int(seed),
        "device": str(dev),
        "seconds": seconds,
    }
    doc["decision"] = _decision(tuned, validate, before, after, fit)
    if tuned and abs(factor - 1.0) > 1e-6:
        doc["note"] = (f"trained at {s:g} px cells; count the images with diameter={d_user:.3g} "
                       f"(cellsynth count IMAGE --model DIR --diameter {d_user:.3g})")
    config["training"] = doc
    counter, path = finish(base=base_counter, candidate=candidate, net=net, accepted=accepted, config=config,
                           out=out, overwrite=overwrite, report_doc=doc)
    seconds["total"] = round(time.perf_counter() - t_start, 2)
    if path is not None:
        from .. import io

        io.write_json(Path(path) / REPORT_FILE, doc, overwrite=True)
    return AdaptResult(counter=counter, path=path, accepted=accepted, report=doc,
                       counts_before=counts_before, counts_after=counts_after)
