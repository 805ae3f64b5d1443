"""Fitting how a density counter turns its prediction into points, to a person's corrected points (no training).

A density counter's points come from its prediction through a few settings:
the minimum peak height (``peak_threshold``), when a foreground object keeps
several peaks (``objects.split_area``), how confident a peak outside the
foreground must be (``objects.keep_outside``) and the nucleus size the image is
brought to (``diameter_scale``). They are cheap to change and hard to
over-fit, so they are fitted first, the way a grid search over detection
parameters is run: the network predicts each corrected image once per nucleus
size, and every combination of the other settings is scored from those
predictions.

The fit is judged by cross-validation over the corrected areas: they are cut
into folds (the corrected images, or quarters of the checked boxes when there
are fewer than three images); for each fold the settings are chosen on the
other folds and scored on it. The fitted settings are kept only when they
count the held-out folds better than the counter's own settings do.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..count.counter import Counter, CounterConfig
from ..count.infer import density_points, model_density
from ..count.metrics import match_points
from ..count.objects import ObjectParams, plane_objects, reconcile_with_objects
from ..count.preprocess import counter_input
from ..progress import ProgressCallback, report
from .checked import inside, region_mask

__all__ = ["FitResult", "GRID", "fit_point_settings", "fold_masks", "with_settings"]

#: The values tried for each setting (the counter's own value is always tried too).
GRID: dict[str, tuple[float, ...]] = {
    "diameter_scale": (0.85, 1.0, 1.2),
    "peak_threshold": (0.2, 0.3, 0.45),
    "split_area": (1.3, 1.6, 2.2, 3.0),
    "keep_outside": (0.4, 0.6, 0.8, 1.5),
}

#: Each setting changed from the counter's own value costs this much of the loss: a change needs evidence.
CHANGE_COST = 0.003


@dataclass
class FitResult:
    """What :func:`fit_point_settings` found.

    ``settings``: the chosen values; ``base``: the counter's own; ``accepted``:
    whether the chosen ones counted the held-out folds better; ``cv_loss`` and
    ``base_cv_loss``: the held-out loss (count error plus 1 - F1 of matched
    points) of the fitted and the counter's settings; ``folds``: per fold
    ``(true count, base count, fitted count)`` held out; ``config``: the counter
    config with the chosen settings (the base's own when not accepted).
    """

    settings: dict
    base: dict
    accepted: bool
    cv_loss: float
    base_cv_loss: float
    folds: list = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"settings": self.settings, "base": self.base, "accepted": self.accepted,
                "cv_loss": round(self.cv_loss, 4), "base_cv_loss": round(self.base_cv_loss, 4), "folds": self.folds}


def _own(config: dict) -> dict:
    """The counter's own point settings (without objects in its config, no object rules to fit)."""
    s = CounterConfig.of(config)
    own = {"diameter_scale": s.diameter_scale, "peak_threshold": s.peak_threshold}
    if s.objects:
        obj = ObjectParams(**s.objects)
        own.update(split_area=obj.split_area, keep_outside=obj.keep_outside)
    return own


def with_settings(config: dict, settings: dict) -> dict:
    """A copy of a density counter's ``config`` with the point settings of :data:`GRID` replaced.

    Examples
    --------
    >>> c = with_settings({"kind": "density", "peak_threshold": 0.3}, {"peak_threshold": 0.45, "split_area": 2.2})
    >>> c["peak_threshold"], c["objects"]["split_area"]
    (0.45, 2.2)
    """
    out = copy.deepcopy(config)
    for key in ("diameter_scale", "peak_threshold"):
        if key in settings:
            out[key] = float(settings[key])
    obj = {k: float(settings[k]) for k in ("split_area", "keep_outside") if k in settings}
    if obj:
        out["objects"] = {**ObjectParams().to_dict(), **(out.get("objects") or {}), **obj}
    return out


def fold_masks(shapes: Sequence[tuple[int, int]], boxes: Sequence[Sequence[tuple]], k: int = 4) -> list[list]:
    """Folds of the checked areas: per fold, one mask per image (None where the fold has nothing there).

    Three or more images: each image is a fold. Fewer: the checked boxes of
    every image are cut into ``k`` parts (quarters of each box: halves of its
    rows times halves of its columns).

    Examples
    --------
    >>> folds = fold_masks([(10, 10)], [[(0, 0, 10, 10)]])
    >>> len(folds), [int(f[0].sum()) for f in folds]
    (4, [25, 25, 25, 25])
    """
    n = len(shapes)
    if n >= 3:
        out = []
        for i in range(n):
            masks = [None] * n
            masks[i] = region_mask(shapes[i], boxes[i]) > 0
            out.append(masks)
        return out
    out = [[None] * n for _ in range(k)]
    for i, (shape, bx) in enumerate(zip(shapes, boxes)):
        parts = [np.zeros(shape, bool) for _ in range(k)]
        for r0, c0, r1, c1 in bx:
            rm, cm = (r0 + r1) // 2, (c0 + c1) // 2
            quarters = [(r0, c0, rm, cm), (r0, cm, rm, c1), (rm, c0, r1, cm), (rm, cm, r1, c1)]
            for j, (a, b, c, d) in enumerate(quarters):
                parts[j % k][a:c, b:d] = True
        for j in range(k):
            out[j][i] = parts[j] if parts[j].any() else None
    return out


def _loss(stats: np.ndarray) -> float:
    """Count error (absolute differences over the true count) plus 1 - F1, from summed (pred, true, tp, abs err)."""
    pred, true, tp, err = stats
    if true == 0 and pred == 0:
        return 0.0
    return float(err / max(true, 1) + 1.0 - 2.0 * tp / max(pred + true, 1))


def fit_point_settings(
    counter: Counter,
    images: Sequence[np.ndarray],
    points: Sequence[np.ndarray],
    boxes: Sequence[Sequence[tuple]],
    diameter: float,
    *,
    grid: Optional[dict] = None,
    progress: Optional[ProgressCallback] = None,
) -> FitResult:
    """Fit a density counter's point settings (:data:`GRID`) to corrected points, judged by cross-validation.

    Parameters
    ----------
    counter : Counter
        A density counter (its network is run, never changed).
    images : sequence of ndarray
        2D images (one plane each).
    points : sequence of ndarray of shape (K, 2)
        The corrected cell centres ``(row, col)`` of each image.
    boxes : sequence of (sequence of (row0, col0, row1, col1))
        Per image, the areas checked (end exclusive).
    diameter : float
        The nucleus diameter the images are counted with (given or estimated).
    grid : dict, optional
        Values to try per setting (default :data:`GRID`).
    progress : ProgressCallback, optional
        Stage ``"fit settings"``, once per image and nucleus size; may raise ``Cancelled``.

    Returns
    -------
    FitResult
    """
    if counter.kind != "density":
        raise ValueError(f"only density counters have point settings to fit, got a {counter.kind} counter")
    grid = grid or GRID
    own = _own(counter.config)
    own_objects = ObjectParams(**counter.settings.objects) if counter.settings.objects else None
    values = {k: sorted(set(grid.get(k, ())) | {own[k]}) for k in own}
    names = list(values)
    combos = [dict(zip(names, v)) for v in itertools.product(*(values[k] for k in names))]
    base_i = combos.index(own)
    shapes = [np.asarray(im).shape[:2] for im in images]
    folds = fold_masks(shapes, boxes)
    radius = 0.5 * diameter
    # stats[c, f] = (predicted, true, matched, |predicted - true|) of combination c in fold f
    stats = np.zeros((len(combos), len(folds), 4))
    steps, total = 0, len(images) * len(values["diameter_scale"])
    for i, (raw, true) in enumerate(zip(images, points)):
        plane = counter_input(np.asarray(raw), counter.config.get("normalize", {}))
        masks = [f[i] for f in folds]
        true_in = [None if m is None else np.asarray(true, float).reshape(-1, 2)[inside(true, m)] for m in masks]
        for ds in values["diameter_scale"]:
            factor = counter.diameter / (diameter * ds)
            dens = model_density(counter, plane, factor)
            # the objects once per nucleus size, the peaks once per threshold: the rules are cheap after them
            objs = plane_objects(plane, diameter=diameter * ds, params=own_objects) if own_objects else None
            peaks = {t: density_points(counter, plane, dens, factor=factor, peak_threshold=t, objects=None)
                     for t in values["peak_threshold"]}
            for c, combo in enumerate(combos):
                if combo["diameter_scale"] != ds:
                    continue
                pts, s_t, d_t = peaks[combo["peak_threshold"]]
                if objs is not None:
                    rule = dataclasses.replace(own_objects, split_area=combo["split_area"],
                                               keep_outside=combo["keep_outside"])
                    pts, _ = reconcile_with_objects(plane, pts, s_t, d_t, diameter=diameter * ds, params=rule,
                                                    objects=objs)
                for f, (m, t) in enumerate(zip(masks, true_in)):
                    if m is None:
                        continue
                    p = pts[inside(pts, m)]
                    tp = match_points(p, t, radius=radius)["tp"]
                    stats[c, f] += (len(p), len(t), tp, abs(len(p) - len(t)))
            steps += 1
            report(progress, "fit settings", steps, total)
    cost = np.array([CHANGE_COST * sum(combo[k] != own[k] for k in names) for combo in combos])

    def choose(use: np.ndarray) -> int:
        losses = np.array([_loss(stats[c, use].sum(axis=0)) for c in range(len(combos))]) + cost
        order = np.argsort(losses, kind="stable")
        return base_i if losses[base_i] <= losses[order[0]] + 1e-12 else int(order[0])

    cv, base_cv, per_fold = 0.0, 0.0, []
    weights = np.maximum(stats[base_i, :, 1], 1.0)  # a fold without cells still counts its extra points
    for f in range(len(folds)):
        rest = np.array([g != f for g in range(len(folds))])
        c = choose(rest)
        cv += weights[f] * _loss(stats[c, f])
        base_cv += weights[f] * _loss(stats[base_i, f])
        per_fold.append((int(stats[base_i, f, 1]), int(stats[base_i, f, 0]), int(stats[c, f, 0])))
    wsum = max(float(weights.sum()), 1.0)
    cv, base_cv = cv / wsum, base_cv / wsum
    best = choose(np.ones(len(folds), bool))
    accepted = bool(best != base_i and cv < base_cv - 1e-9)
    chosen = combos[best] if accepted else own
    config = with_settings(counter.config, chosen) if accepted else copy.deepcopy(counter.config)
    return FitResult(settings={k: float(v) for k, v in chosen.items()}, base={k: float(v) for k, v in own.items()},
                     accepted=accepted, cv_loss=cv, base_cv_loss=base_cv, folds=per_fold, config=config)
