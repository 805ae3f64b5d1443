"""The regions a person checked: input checks, masks, held-out strips, and the errors counted in them.

Retraining (:mod:`cellsynth.adapt.retrain`) and the fit of the point settings
(:mod:`cellsynth.adapt.fit`) read corrected points only inside these regions.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..count.counter import CounterConfig
from ._train import Item, forward_density, peak_count

__all__ = ["check_points", "check_regions", "region_mask", "scaled_boxes", "region_error", "split_validation",
           "inside", "validation_error"]


def check_points(points, shapes: list[tuple[int, int]]) -> list[np.ndarray]:
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


def check_regions(regions, shapes: list[tuple[int, int]]) -> list[Optional[list[tuple[int, int, int, int]]]]:
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


def scaled_boxes(boxes, factor: float, shape) -> list[tuple[int, int, int, int]]:
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

        def n_in(c):  # points in the pixel their coordinates fall in (the targets' own rounding)
            if len(c) == 0:
                return 0
            r = np.clip(np.floor(c[:, 0]).astype(int), 0, m.shape[0] - 1)
            k = np.clip(np.floor(c[:, 1]).astype(int), 0, m.shape[1] - 1)
            return int((m[r, k] > 0).sum())

        n_pred, n_true = n_in(pts), n_in(it.centres)
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


def inside(points: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Which points' nearest pixels lie in ``mask`` (clipped to the image)."""
    pts = np.asarray(points, float).reshape(-1, 2)
    r = np.clip(np.floor(pts[:, 0] + 0.5).astype(int), 0, mask.shape[0] - 1)
    c = np.clip(np.floor(pts[:, 1] + 0.5).astype(int), 0, mask.shape[1] - 1)
    return mask[r, c] > 0


def validation_error(counter, images, points, val_boxes, diameter: float) -> dict:
    """Errors in the validation boxes as :func:`~cellsynth.count.count_cells` counts the whole images.

    Points are matched to the true cells one to one within half a diameter over
    the whole image, so a nucleus on a box's edge is not an error when its point
    falls just outside. ``misses``: true cells in the boxes left unmatched;
    ``extras``: points in the boxes matched to no cell; ``error``: ``(misses +
    extras) / n_true``; ``precision``, ``recall``, ``f1`` of the matched points in
    the boxes; ``count_error``: summed absolute count differences in the boxes over
    ``n_true``; ``density_error``: the same for the density sum; ``score``:
    ``error + 0.25 * density_error``; ``n_true``: true cells in the boxes.
    """
    from ..count.infer import count_cells
    from ..count.metrics import match_points

    misses = extras = tp = n_pred = 0
    cerr = derr = 0.0
    tot = 0
    for im, pts, vb in zip(images, points, val_boxes):
        if not vb:
            continue
        res = count_cells(im, counter=counter, diameter=diameter, engine="torch")
        shape = np.asarray(im).shape[:2]
        mask = region_mask(shape, vb)
        t_in, p_in = inside(pts, mask), inside(res.points, mask)
        # matched near the strips only (a point farther than the radius from them cannot matter)
        r = 0.5 * diameter
        near = region_mask(shape, [(max(0.0, b[0] - r), max(0.0, b[1] - r), b[2] + r, b[3] + r) for b in vb])
        t_near, p_near = np.flatnonzero(inside(pts, near)), np.flatnonzero(inside(res.points, near))
        m = match_points(np.asarray(res.points)[p_near], np.asarray(pts)[t_near], radius=r, indices=True)
        matched_true = np.zeros(len(t_in), bool)
        matched_true[t_near[m["pairs"][:, 1]]] = True
        matched_pred = np.zeros(len(p_in), bool)
        matched_pred[p_near[m["pairs"][:, 0]]] = True
        misses += int((t_in & ~matched_true).sum())
        extras += int((p_in & ~matched_pred).sum())
        tp += int((t_in & matched_true).sum())
        n_pred += int(p_in.sum())
        cerr += abs(int(p_in.sum()) - int(t_in.sum()))
        mass = float((res.density * mask).sum(dtype=np.float64)) if res.density is not None else float(p_in.sum())
        derr += abs(mass - int(t_in.sum()))
        tot += int(t_in.sum())
    tot_ = max(tot, 1)
    err = (misses + extras) / tot_
    return {"error": err, "misses": misses, "extras": extras, "precision": tp / max(tp + extras, 1),
            "recall": tp / tot_, "f1": 2 * tp / max(2 * tp + misses + extras, 1), "count_error": cerr / tot_,
            "density_error": derr / tot_, "score": err + 0.25 * derr / tot_, "n_true": tot}
