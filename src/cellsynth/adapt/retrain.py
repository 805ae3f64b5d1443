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
from ._train import Item, crop_item, finetune, make_item, stack_batch
from .checked import (check_points, check_regions, region_error, region_mask, scaled_boxes, split_validation,
                      validation_error)
from .fast_style import matched_layouts
from .fit import GRID, FitResult, fit_point_settings
from .stats import combine_stats, estimate_image_stats

__all__ = ["retrain_counter", "region_mask", "region_error", "split_validation", "validation_error"]


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
        self.pts = check_points(points, shapes)
        self.boxes = check_regions(regions, shapes)
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
            self.work_boxes.append(scaled_boxes(tb, factor, pl.shape))
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
