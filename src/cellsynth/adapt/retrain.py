"""Retraining a density counter from a person's corrected points, counted only where they checked.

Steps of :func:`retrain_counter`:

1. check inputs (images, points, checked regions);
2. fit the counter's point settings (peak threshold, object split and keep
   rules, nucleus size) to the corrected points without training, kept only
   when they count held-out folds of the corrections better
   (:func:`~cellsynth.adapt.fit.fit_point_settings`);
3. bring images, points and regions to the base's own scale (its diameter: the
   network learns the images' look, not a new scale); density targets from the points and
   a loss mask of the checked regions (the whole image when none is given):
   outside them the loss is zero;
4. a small replay set of stylized synthetic layouts (against forgetting), a few
   of them held out;
5. hold out a strip of the checked regions for validation (the last quarter of
   each box's longer side, when that strip is at least two nuclei wide): the
   points there are not trained on;
6. count and score the base: the errors in the validation strips as counting
   gives them (points matched one to one to the annotated cells over the whole
   image: missed and extra cells in the strips, plus a quarter of the
   density-sum error to break ties), and the error on held-out synthetic layouts;
7. when the strips hold at least :data:`WEAK_VALIDATION` annotated cells,
   fine-tune a copy of the base on crops placed over the training part of the
   checked regions, mixed with replay crops, for the time budget, with the
   BatchNorm statistics of the base kept; score it on the validation strips at
   each quarter of the budget and keep the best state (early stopping); with
   fewer there is no evidence to keep a new network by, and nothing is trained;
8. keep the new network when it makes at least :data:`MIN_FIXED` fewer errors
   in the strips than the base's network (with the fitted settings) and its
   held-out synthetic error did not grow much; else the base's network with the
   fitted settings when they were kept, else the base itself
   (``accepted=False``); the decision says which and why, with the numbers;
9. count with the kept counter, write the report and the counter.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..count.counter import CounterConfig
from ..progress import ProgressCallback, report
from ._common import (AdaptParams, AdaptResult, Steps, check_budget, check_images, count_images, load_base,
                      working_planes)
from ._output import check_out
from ._train import Item, crop_item, finetune, forward_density, make_item, peak_count, stack_batch
from .fast_style import matched_layouts
from .fit import GRID, FitResult, fit_point_settings
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
        t_in, p_in = _inside(pts, mask), _inside(res.points, mask)
        # matched near the strips only (a point farther than the radius from them cannot matter)
        r = 0.5 * diameter
        near = region_mask(shape, [(max(0.0, b[0] - r), max(0.0, b[1] - r), b[2] + r, b[3] + r) for b in vb])
        t_near, p_near = np.flatnonzero(_inside(pts, near)), np.flatnonzero(_inside(res.points, near))
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


#: A retrained network is kept only when the held-out strips hold at least this many annotated cells (with 10,
#: a network that fixed 2 of them counted the other frames of a series 10 % worse: too little evidence),
WEAK_VALIDATION = 20
#: and when it makes at least this many fewer errors (missed plus extra cells) there than the base: one cell is
#: not evidence.
MIN_FIXED = 2


def _fit_settings(counter, planes, points, boxes, diameter, progress, scale: bool = True) -> FitResult:
    """:func:`~cellsynth.adapt.fit.fit_point_settings` for density counters; other kinds keep their settings.

    ``scale=False`` (no diameter given: counted at the model's scale, where a nucleus size has no effect) keeps
    the counter's ``diameter_scale``.
    """
    if counter.kind == "density":
        grid = GRID if scale else {**GRID, "diameter_scale": ()}
        return fit_point_settings(counter, planes, points, boxes, diameter, progress=progress, grid=grid)
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


def _decision(accepted: bool, validate: bool, before: dict, after: dict, fit: FitResult) -> str:
    """One line a person can judge: what was decided, on what evidence, with the numbers.

    ``accepted``: whether the retrained network was kept; ``fit``: the point settings fitted before.
    """
    line = _network_line(accepted, validate, before, after)
    verdict = "accepted" if (accepted or fit.accepted) else "kept the base"
    return f"{verdict}: {_settings_line(fit)}; {line}"


def _network_line(accepted: bool, validate: bool, before: dict, after: dict) -> str:
    verdict = "retrained network kept" if accepted else "retrained network not kept"
    if validate:
        v0, v1 = before["validation"], after["validation"]
        n = int(v0["n_true"])
        why = (f"in the held-out strip ({n} annotated cells) the base misses {v0['misses']} and adds {v0['extras']} "
               f"(F1 {v0['f1']:.2f}), the retrained network misses {v1['misses']} and adds {v1['extras']} "
               f"(F1 {v1['f1']:.2f})")
        if n < WEAK_VALIDATION:
            why += (f"; too few to show a gain: a retrained network needs at least {WEAK_VALIDATION} held-out cells "
                    "(correct a larger region or more images)")
        elif (v0["misses"] + v0["extras"]) - (v1["misses"] + v1["extras"]) < MIN_FIXED:
            why += f"; a retrained network must make at least {MIN_FIXED} fewer errors there"
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
        Stages ``"fit settings"``, ``"count before"``, ``"train"``, ``"check"``, ``"count after"``;
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
    from ..device import resolve_device

    p = params or AdaptParams()
    if not isinstance(p, AdaptParams):
        raise TypeError(f"params must be an AdaptParams, got {type(p).__name__}")
    run = _Run(p=p, progress=progress, seed=seed, minutes=minutes)
    # 1. check inputs
    run.inputs(images, points, regions)
    check_budget(minutes, seed)
    out = check_out(out, overwrite)
    run.dev = resolve_device(device)
    # 2. the base, the diameter and the point settings fitted to the corrections
    run.base = load_base(base, run.dev)
    run.diameter(diameter)
    run.fit = _fit_settings(run.base, run.flat, run.pts, run.checked, run.d_user, progress,
                            scale=diameter is not None)
    run.lap("fit_settings")
    # 3.-4. working scale, validation strips, targets, replay layouts
    run.targets()
    run.replay()
    # 5.-7. score the base, fine-tune, judge
    run.score_base()
    run.train()
    run.judge()
    # 8. counts, report, write
    return run.conclude(run.candidate(), diameter, out=out, overwrite=overwrite)


def _worth_training(run: "_Run") -> bool:
    """Whether a new network could be kept: only with enough held-out cells to judge it by."""
    return bool(run.validate and run.before["validation"]["n_true"] >= WEAK_VALIDATION)


class _Run(Steps):
    """The state of one retraining, step by step (see the module's list of steps)."""

    def inputs(self, images, points, regions) -> None:
        from ..count.preprocess import split_planes

        self.imgs = check_images(images)
        self.flat = []
        for i, im in enumerate(self.imgs):
            planes, _ = split_planes(im)
            if len(planes) != 1:
                raise ValueError(f"images[{i}] is a stack of {len(planes)} planes; retraining takes 2D images")
            self.flat.append(planes[0])
        shapes = [pl.shape for pl in self.flat]
        self.pts = _check_points(points, shapes)
        self.boxes = _check_regions(regions, shapes)
        self.checked = [[(0, 0, sh[0], sh[1])] if bx is None else bx for bx, sh in zip(self.boxes, shapes)]
        self.restart()

    def diameter(self, diameter) -> None:
        if diameter is None:  # at the base's own scale, as count_cells(diameter=None) counts
            self.d_user, self.per_image = self.base.diameter / self.base.settings.diameter_scale, []
        else:
            self.per_image = [estimate_image_stats(im, diameter=diameter) for im in self.imgs]
            self.d_user = combine_stats(self.per_image)["diameter"]
        self.lap("prepare")

    def targets(self) -> None:
        """Working scale, validation strips, density targets and loss masks at that scale."""
        self.d_eff = d_eff = self.d_user * CounterConfig.of(self.fit.config).diameter_scale  # as the fit sees them
        # at the base's own scale: the network learns the images' look, not a new scale, and the held-out
        # strip compares it with the base as the base counts
        self.s = self.base.diameter
        self.factor = factor = self.s / d_eff
        config = copy.deepcopy(self.fit.config)
        self.base_training = config.pop("training", None)
        config.pop("dtype", None)
        config.update(diameter=self.s, name="retrained")
        self.config = config
        gap = int(np.ceil((4.0 * CounterConfig.of(config).sigma + 2.0) / factor))  # a target's density reach
        split = [split_validation(bx, min_side=2.0 * self.d_user, gap=gap) for bx in self.checked]
        train_boxes, self.val_boxes = [sp[0] for sp in split], [sp[1] for sp in split]
        self.planes = working_planes(self.imgs, config, factor)
        self.user, self.work_boxes = [], []
        for pl, c, tb, vb, bx in zip(self.planes, self.pts, train_boxes, self.val_boxes, self.boxes):
            cw = (c + 0.5) * factor - 0.5
            mask = None if (bx is None and not vb) else region_mask(pl.shape, tb, factor)
            self.user.append(make_item(pl, cw, config, mask))
            self.work_boxes.append(_scaled_boxes(tb, factor, pl.shape))
        self.lap("targets")

    def replay(self) -> None:
        """Stylized synthetic layouts like the images: replayed against forgetting, a few held out."""
        p = self.p
        fg = float(np.mean([st["foreground_fraction"] for st in self.per_image])) if self.per_image else 0.15
        n_replay = max(1, p.n_layouts // 2)
        lays = matched_layouts({"diameter": self.d_eff, "foreground_fraction": fg}, n_replay + p.n_holdout,
                               shape=(p.layout_size, p.layout_size), scale=self.factor, references=self.planes,
                               rng=self.seed)
        self.replay_items = [make_item(img, cen, self.config) for img, cen in lays[:n_replay]]
        self.holdout = lays[n_replay:]
        self.lap("layouts")

    def val_score(self) -> dict:
        return validation_error(self.live, self.flat, self.pts, self.val_boxes, self.d_user)

    def score_base(self) -> None:
        from ..count.models import Counter, to_device

        self.counts_before = count_images(self.imgs, self.base, self.d_user, self.progress, "count before")
        self.lap("count_before")
        dev = self.dev
        self.base_net = copy.deepcopy(self.base.net).float().to(dev).eval()
        self.net = copy.deepcopy(self.base_net)
        # the candidate as counting runs it (points reconciled with objects), sharing the training network; off
        # the CPU it stays in float32 (to_device would turn the network being trained into half precision)
        live = Counter(kind="density", name="retrained", config=copy.deepcopy(self.config), net=self.net)
        if dev.type == "cpu":
            self.live = to_device(live, dev)
        else:
            import torch

            live.device, live.dtype = dev, torch.float32
            self.live = live
        self.before = {"region_error": region_error(self.base_net, self.config, self.user, dev)["error"],
                       "synthetic_error": _synthetic_error(self.base_net, self.config, self.holdout, dev)}
        self.validate = any(self.val_boxes)
        if self.validate:
            self.before["validation"] = self.val_score()
            self.validate = self.before["validation"]["n_true"] > 0
        report(self.progress, "check", 1, 2, "base scored")
        self.lap("check_before")

    def train(self) -> None:
        """Fine-tune, keeping the state that counts the validation strips best.

        Without enough held-out cells to judge a new network by, nothing is trained
        (a network that cannot be kept is not worth the wait).
        """
        p, validate = self.p, self.validate
        if not _worth_training(self):
            self.info = {"steps": 0, "seconds": 0.0, "validation": [], "best_step": 0,
                         "skipped": f"fewer than {WEAK_VALIDATION} annotated cells can be held out"}
            self.improved = False
            self.lap("train")
            return
        best = {"step": 0, "score": self.before["validation"]["score"] if validate else None, "state": None}
        history: list[dict] = []

        def on_check(trained, step: int) -> None:
            v = self.val_score()
            history.append({"step": int(step), **v})
            if v["score"] < best["score"] - 1e-9:
                best.update(step=int(step), score=v["score"],
                            state={k: x.detach().clone() for k, x in trained.state_dict().items()})

        budget = self.budget_left()
        self.net, info = finetune(self.net, _retrain_sampler(self.user, self.work_boxes, self.replay_items, p),
                                  seconds=budget, max_steps=p.max_steps, min_steps=p.min_steps, lr=p.lr,
                                  scale=CounterConfig.of(self.config).density_scale, device=self.dev, seed=self.seed,
                                  progress=self.progress, freeze_bn=True, checks=4 if validate else 0,
                                  on_check=on_check if validate else None)
        if validate and best["state"] is not None:
            self.net.load_state_dict(best["state"])
        self.info = {**info, "validation": history, "best_step": best["step"]}
        self.improved = best["state"] is not None
        self.lap("train")

    def judge(self) -> None:
        """Keep the retrained network only on evidence; the fitted settings on their own cross-validation."""
        dev, before = self.dev, self.before
        self.after = after = {"region_error": region_error(self.net, self.config, self.user, dev)["error"],
                              "synthetic_error": _synthetic_error(self.net, self.config, self.holdout, dev)}
        synthetic_ok = after["synthetic_error"] <= max(1.5 * before["synthetic_error"],
                                                       before["synthetic_error"] + 0.05)
        self.tuned = False  # nothing held out: a gain cannot be told from over-fitting
        if self.validate:
            after["validation"] = self.val_score()
            v0, v1 = before["validation"], after["validation"]
            enough = v0["n_true"] >= WEAK_VALIDATION
            fixed = (v0["misses"] + v0["extras"]) - (v1["misses"] + v1["extras"])
            self.tuned = bool(self.improved and synthetic_ok and enough and fixed >= MIN_FIXED)
        self.accepted = self.tuned or self.fit.accepted
        report(self.progress, "check", 2, 2, "accepted" if self.accepted else "kept the base")
        self.lap("check_after")

    def candidate(self):
        """The retrained network, or the base's with the fitted point settings (the base's own when not kept)."""
        from ..count.models import Counter, to_device

        if not self.tuned:
            self.config, self.net = copy.deepcopy(self.fit.config), copy.deepcopy(self.base_net)
            self.config.pop("training", None)
            self.config.pop("dtype", None)
            self.config["name"] = "retrained"
        return to_device(Counter(kind="density", name="retrained", config=copy.deepcopy(self.config),
                                 net=copy.deepcopy(self.net)), self.dev)

    def report_doc(self, diameter) -> dict:
        rule = (f"network: validation strips (at least {WEAK_VALIDATION} annotated cells) counted better than by "
                "the base, held-out synthetic layouts not much worse; point settings: held-out folds of the "
                "corrections counted better")
        doc = {
            "operation": "retrain-counter", "accepted": self.accepted, "base": self.base.describe(),
            "base_training": self.base_training, "n_images": len(self.imgs),
            "n_points": [int(len(c)) for c in self.pts],
            "regions": [None if b is None else [list(x) for x in b] for b in self.boxes],
            "validation_regions": [[list(x) for x in vb] for vb in self.val_boxes],
            "acceptance": rule, "point_settings": self.fit.to_dict(), "network_accepted": self.tuned,
            "diameter": {"used": self.d_user, "given": diameter if not isinstance(diameter, str) else None,
                         "per_image": [st["diameter"] for st in self.per_image]},
            "working_scale": self.s, "scale_factor": self.factor, "n_replay": len(self.replay_items),
            "n_holdout": len(self.holdout), "training": self.info, "score_before": self.before,
            "score_after": self.after, "counts_before": self.counts_before, "counts_after": self.counts_after,
            "params": self.p.to_dict(), "minutes": float(self.minutes), "seed": int(self.seed),
            "device": str(self.dev), "seconds": self.seconds,
        }
        doc["decision"] = _decision(self.tuned, self.validate, self.before, self.after, self.fit)
        if self.tuned and abs(self.factor - 1.0) > 1e-6:
            d = self.d_user
            doc["note"] = (f"trained at {self.s:g} px cells; count the images with diameter={d:.3g} "
                           f"(cellsynth count IMAGE --model DIR --diameter {d:.3g})")
        return doc
