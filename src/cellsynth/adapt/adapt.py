"""Label-free adaptation of a density counter to a user's unlabelled images.

Steps of :func:`adapt_counter`:

1. check inputs;
2. estimate the nucleus size and density of the images (:func:`estimate_image_stats`);
3. load the base counter, choose the working scale (the user's own pixel size
   when it is within the base's range, so the adapted counter counts the user's
   images without rescaling) and prepare the images at that scale;
4. generate Syn-HC layouts whose cell size and density match, stylized like the
   user's images (:func:`fast_stylize`, or InST when Stable Diffusion weights and
   a GPU are present); a few are held out for checking;
5. count the images with the base counter and score it without labels;
6. fine-tune a copy of the base for the remaining time: each batch holds
   stylized labelled crops and, DACS-style, labelled crops with a box of a user
   crop pasted in, labelled there by an EMA teacher's density peaks;
7. score the candidate the same way and keep it only when it scores better
   than the base, is not less consistent on the user's images and its counts
   there move by at most 5 % (else the base is returned, ``accepted=False``;
   see :func:`refusal`);
8. count the images with the kept counter, write the report and the counter.

The label-free score (lower is better) is the relative count error on the
held-out stylized layouts (which are labelled) plus half the count
inconsistency under a transpose of the user's images (test-time augmentation)
plus half the disagreement between the number of peaks and the density sum on
the user's images.
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
from ._train import Item, crop_item, finetune, forward_density, make_item, peak_count, stack_batch, working_scale
from .fast_style import matched_layouts
from .stats import combine_stats, estimate_image_stats

__all__ = ["AdaptParams", "AdaptResult", "adapt_counter", "label_free_score", "STYLIZE_MODES"]

STYLIZE_MODES = ("auto", "inst", "fast")


def _scoring_view(plane: np.ndarray, limit: int = 1024) -> np.ndarray:
    r0 = max(0, (plane.shape[0] - limit) // 2)
    c0 = max(0, (plane.shape[1] - limit) // 2)
    return np.ascontiguousarray(plane[r0:r0 + limit, c0:c0 + limit])


def label_free_score(net, config: dict, user: Sequence[np.ndarray], holdout: Sequence[tuple], device) -> dict:
    """Score a network at the working scale without user labels (lower ``score`` is better).

    Parameters
    ----------
    net : torch.nn.Module
        Density network in eval mode.
    config : dict
        Counter config whose ``diameter`` is the working scale.
    user : sequence of ndarray
        The user's normalised planes at the working scale.
    holdout : sequence of (image, centres)
        Labelled stylized layouts never trained on.
    device : torch.device

    Returns
    -------
    dict
        ``synthetic_error`` (sum of absolute count errors over the sum of true
        counts on ``holdout``), ``tta_inconsistency`` (mean relative change of
        the count under a transpose), ``peak_density_gap`` (mean relative gap
        between peaks and density sum), ``score`` and the user ``counts``.
    """
    scale = CounterConfig.of(config).density_scale
    stride = int(getattr(net, "stride", 16))
    abs_err, n_true = 0.0, 0
    for img, centres in holdout:
        pts, _ = peak_count(forward_density(net, img, scale=scale, device=device, stride=stride), config)
        abs_err += abs(len(pts) - len(centres))
        n_true += len(centres)
    syn = abs_err / max(n_true, 1)
    tta, gap, counts = [], [], []
    for plane in user:
        v = _scoring_view(plane)
        d0 = forward_density(net, v, scale=scale, device=device, stride=stride)
        d1 = forward_density(net, np.ascontiguousarray(v.T), scale=scale, device=device, stride=stride)
        n0, n1 = len(peak_count(d0, config)[0]), len(peak_count(d1, config)[0])
        s0 = float(d0.sum(dtype=np.float64))
        tta.append(abs(n0 - n1) / (0.5 * (n0 + n1) + 1.0))
        gap.append(abs(n0 - s0) / (s0 + 1.0))
        counts.append(n0)
    t, g = float(np.mean(tta)) if tta else 0.0, float(np.mean(gap)) if gap else 0.0
    return {"score": float(syn + 0.5 * t + 0.5 * g), "synthetic_error": float(syn), "tta_inconsistency": t,
            "peak_density_gap": g, "counts": counts}


def _user_part(score: dict) -> float:
    return 0.5 * float(score.get("tta_inconsistency", 0.0)) + 0.5 * float(score.get("peak_density_gap", 0.0))


#: Without labels nothing shows that a count is right: an adapted counter whose counts on the user's images move
#: by more than this (mean relative change) is refused, whatever its label-free score.
MAX_SHIFT = 0.05


def refusal(before: dict, after: dict, margin: float = 0.0, tolerance: float = 0.0,
            max_shift: float = MAX_SHIFT) -> Optional[str]:
    """Why the candidate is refused (one line), or None when it is kept.

    It is kept when it scores better without doing worse on any part that could
    show it: its score is lower by ``margin``; its synthetic error is not higher;
    its consistency on the user's own images (half the transpose inconsistency plus
    half the peak/density gap) is not worse by more than ``tolerance``; and its
    counts on the user's images (``counts``, when the scores have them) move by at
    most ``max_shift`` on average. The held-out stylized layouts are drawn like the
    training layouts, so the synthetic error alone improves with almost any
    fine-tuning; only the user-image terms see the user's images, and no label
    says which of two different counts is right.

    Examples
    --------
    >>> base = {"score": 0.3, "synthetic_error": 0.2, "tta_inconsistency": 0.1, "peak_density_gap": 0.1,
    ...         "counts": [100, 50]}
    >>> refusal(base, {**base, "score": 0.2, "synthetic_error": 0.1, "counts": [102, 51]}) is None
    True
    >>> refusal(base, {"score": 0.2, "synthetic_error": 0.25, "tta_inconsistency": 0.0, "peak_density_gap": 0.0})
    'it counts the held-out stylized layouts worse (0.200 -> 0.250)'
    >>> refusal(base, {**base, "score": 0.2, "synthetic_error": 0.1, "counts": [120, 50]})
    'its counts on your images move by 10.0 % on average (at most 5 % without labels to show which is right)'
    """
    if not after["score"] < before["score"] - margin:
        return f"its label-free score is not lower ({before['score']:.3f} -> {after['score']:.3f})"
    if not after["synthetic_error"] <= before["synthetic_error"] + 1e-9:
        return (f"it counts the held-out stylized layouts worse ({before['synthetic_error']:.3f} -> "
                f"{after['synthetic_error']:.3f})")
    if not _user_part(after) <= _user_part(before) + tolerance:
        return (f"it is less consistent on your images (transpose and peak/density checks "
                f"{_user_part(before):.3f} -> {_user_part(after):.3f})")
    shift = count_shift(before.get("counts"), after.get("counts"))
    if shift > max_shift:
        return (f"its counts on your images move by {100 * shift:.1f} % on average (at most {100 * max_shift:g} % "
                "without labels to show which is right)")
    return None


def count_shift(before, after) -> float:
    """Mean relative change of per-image counts (0 when there are none to compare).

    Examples
    --------
    >>> count_shift([100, 50], [90, 50])
    0.05
    """
    if not before or not after or len(before) != len(after):
        return 0.0
    b, a = np.asarray(before, float), np.asarray(after, float)
    return float(np.mean(np.abs(a - b) / np.maximum(b, 1.0)))


def resolve_stylize(stylize: str) -> str:
    """``"fast"`` or ``"inst"`` for a requested mode; ``"inst"`` without weights or GPU is a ValueError."""
    from ._inst import inst_available

    if stylize not in STYLIZE_MODES:
        raise ValueError(f"stylize must be one of {STYLIZE_MODES}, got {stylize!r}")
    if stylize == "fast":
        return "fast"
    ok, why = inst_available()
    if stylize == "inst" and not ok:
        raise ValueError(f"stylize='inst' is not possible here: {why}; use stylize='fast' or 'auto'")
    return "inst" if ok else "fast"


# ----------------------------------------------------------------------------- adaptation

def _adapt_sampler(train: list[Item], user: list[Item], p: AdaptParams, config: dict, device):
    """Batches of labelled stylized crops and DACS-mixed crops (user box, teacher pseudo-labels)."""
    import torch

    n_mix = int(round(p.batch_size * p.mix_share)) if user else 0
    scale = CounterConfig.of(config).density_scale

    def sample(rng: np.random.Generator, teacher):
        parts = [crop_item(train[int(rng.integers(0, len(train)))], p.crop, rng) for _ in range(p.batch_size)]
        if n_mix and teacher is not None:
            ucrops = [crop_item(user[int(rng.integers(0, len(user)))], p.crop, rng)[0] for _ in range(n_mix)]
            with torch.no_grad():
                x = torch.from_numpy(np.stack(ucrops)[:, None]).to(device)
                dens = teacher(x).float().cpu().numpy()[:, 0] / scale
            for j, (u, d) in enumerate(zip(ucrops, dens)):
                pts, sc = peak_count(d, {**config, "peak_threshold": p.pseudo_threshold})
                pseudo = make_item(u, pts, config).target
                conf = float((sc > 0.6).mean()) if len(sc) else 1.0
                img, tgt, _ = parts[j]
                lam = rng.beta(1.0, 1.0)
                h = w = int(round(p.crop * np.sqrt(lam)))
                r0, c0 = int(rng.integers(0, p.crop - h + 1)), int(rng.integers(0, p.crop - w + 1))
                img, tgt = img.copy(), tgt.copy()
                msk = np.ones_like(img)
                img[r0:r0 + h, c0:c0 + w] = u[r0:r0 + h, c0:c0 + w]
                tgt[r0:r0 + h, c0:c0 + w] = pseudo[r0:r0 + h, c0:c0 + w]
                msk[r0:r0 + h, c0:c0 + w] = conf
                parts[j] = (img, tgt, msk)
        return stack_batch(parts)

    return sample


def _layouts(stats, factor, user_planes, p: AdaptParams, mode: str, seed: int, progress):
    layouts = matched_layouts(stats, p.n_layouts + p.n_holdout, shape=(p.layout_size, p.layout_size), scale=factor,
                              references=user_planes if mode == "fast" else (), rng=seed, progress=progress)
    if mode == "inst":
        from ._inst import inst_stylize

        layouts = inst_stylize(layouts, user_planes, seed=seed, progress=progress)
    report(progress, "layouts", 1, 1, f"{len(layouts)} {mode}-stylized layouts")
    return layouts[:p.n_layouts], layouts[p.n_layouts:]


def adapt_counter(
    images: Sequence[np.ndarray],
    *,
    out: Union[str, os.PathLike, None],
    base: Any = "default",
    diameter: Union[float, str] = "auto",
    minutes: float = 3.0,
    stylize: str = "auto",
    seed: int = 0,
    device: Any = "auto",
    progress: Optional[ProgressCallback] = None,
    overwrite: bool = False,
    params: Optional[AdaptParams] = None,
) -> AdaptResult:
    """Adapt a counter to unlabelled images, without any labels.

    Parameters
    ----------
    images : sequence of ndarray
        The user's images (2D, multichannel or stacks; see
        :func:`~cellsynth.count.preprocess.split_planes`), all of one kind.
    out : path-like or None
        Folder for the counter (``model.safetensors``, ``config.json``,
        ``adapt_report.json``), written atomically at the end; None writes nothing.
    base : str, path-like or Counter
        The density counter to start from (``"default"``).
    diameter : float or "auto"
        Nucleus diameter in pixels in ``images``; ``"auto"`` estimates it.
    minutes : float
        Wall-time budget of the whole run; training gets what the other steps leave.
    stylize : {"auto", "inst", "fast"}
        How layouts are made to look like the images. ``"inst"`` needs Stable
        Diffusion weights on disk and a CUDA GPU; ``"auto"`` uses it then, else ``"fast"``.
    seed : int
    device : str or torch.device
    progress : ProgressCallback, optional
        Stages ``"stats"``, ``"layouts"``, ``"count before"``, ``"check"``,
        ``"train"``, ``"count after"``; may raise ``Cancelled`` (then nothing is written).
    overwrite : bool
        Replace a non-empty ``out``.
    params : AdaptParams, optional

    Returns
    -------
    AdaptResult

    Raises
    ------
    ValueError, TypeError
        Bad images or settings; ``stylize="inst"`` where it cannot run.
    FileExistsError
        ``out`` is not empty and ``overwrite`` is False.
    """
    from ..device import resolve_device

    p = params or AdaptParams()
    if not isinstance(p, AdaptParams):
        raise TypeError(f"params must be an AdaptParams, got {type(p).__name__}")
    run = _Run(p=p, progress=progress, seed=seed, minutes=minutes)
    # 1. check inputs
    run.imgs = check_images(images)
    check_budget(minutes, seed)
    out = check_out(out, overwrite)
    run.mode = resolve_stylize(stylize)
    run.dev = resolve_device(device)
    run.restart()
    # 2.-4. statistics, the base and the working scale, layouts
    run.statistics(diameter)
    run.base = load_base(base, run.dev)
    run.working_scale()
    run.layouts, run.holdout = _layouts(run.stats, run.factor, run.user_planes, p, run.mode, seed, progress)
    run.lap("layouts")
    # 5.-7. score the base, fine-tune, the label-free check
    run.score_base()
    run.train()
    run.judge()
    # 8. counts with the kept counter, report, write
    from ..count.models import Counter, to_device

    candidate = to_device(Counter(kind="density", name="adapted", config=copy.deepcopy(run.config),
                                  net=copy.deepcopy(run.net)), run.dev)
    return run.conclude(candidate, diameter, out=out, overwrite=overwrite)


class _Run(Steps):
    """The state of one adaptation, step by step (see the module's list of steps)."""

    def statistics(self, diameter) -> None:
        self.per_image = []
        for i, im in enumerate(self.imgs):
            self.per_image.append(estimate_image_stats(im, diameter=diameter))
            report(self.progress, "stats", i + 1, len(self.imgs))
        self.stats = combine_stats(self.per_image)
        self.d_user = self.stats["diameter"]
        self.lap("stats")

    def working_scale(self) -> None:
        d_eff = self.d_user * self.base.settings.diameter_scale  # the nuclei as the base's fitted settings see them
        self.stats = {**self.stats, "diameter": d_eff}
        self.s = working_scale(d_eff, self.base.diameter, self.p.span)
        self.factor = self.s / d_eff
        config = copy.deepcopy(self.base.config)
        config.pop("training", None)
        config.pop("dtype", None)
        config.update(diameter=self.s, name="adapted")
        self.config = config
        self.user_planes = working_planes(self.imgs, config, self.factor)

    def score_base(self) -> None:
        self.counts_before = count_images(self.imgs, self.base, self.d_user, self.progress, "count before")
        self.lap("count_before")
        self.base_net = copy.deepcopy(self.base.net).float().to(self.dev).eval()
        self.score_before = label_free_score(self.base_net, self.config, self.user_planes, self.holdout, self.dev)
        report(self.progress, "check", 1, 2, "base scored")
        self.lap("check_before")

    def train(self) -> None:
        """Fine-tune for the time left, keeping enough for the check, the counts after and the write."""
        p, config = self.p, self.config
        train = [make_item(img, cen, config) for img, cen in self.layouts]
        user = [Item(pl, None) for pl in self.user_planes]
        net = copy.deepcopy(self.base_net).train()
        self.net, self.info = finetune(net, _adapt_sampler(train, user, p, config, self.dev),
                                       seconds=self.budget_left(), max_steps=p.max_steps, min_steps=p.min_steps,
                                       lr=p.lr, scale=CounterConfig.of(config).density_scale, device=self.dev,
                                       seed=self.seed, ema=p.ema if p.mix_share > 0 else None,
                                       progress=self.progress)
        self.lap("train")

    def judge(self) -> None:
        self.score_after = label_free_score(self.net, self.config, self.user_planes, self.holdout, self.dev)
        self.why_not = refusal(self.score_before, self.score_after, self.p.margin)
        self.accepted = self.why_not is None
        report(self.progress, "check", 2, 2, "accepted" if self.accepted else "kept the base")
        self.lap("check_after")

    def report_doc(self, diameter) -> dict:
        doc = {
            "operation": "adapt-counter", "accepted": self.accepted,
            "decision": "accepted: a lower label-free score, no worse on any part of it" if self.accepted else
                        f"kept the base: {self.why_not}",
            "base": self.base.describe(), "n_images": len(self.imgs),
            "diameter": {"used": self.d_user, "given": None if isinstance(diameter, str) else float(diameter),
                         "per_image": [st["diameter"] for st in self.per_image]},
            "stats": {"combined": self.stats, "per_image": self.per_image},
            "working_scale": self.s, "scale_factor": self.factor, "stylization": self.mode,
            "n_layouts": len(self.layouts), "n_holdout": len(self.holdout), "training": self.info,
            "score_before": {k: v for k, v in self.score_before.items() if k != "counts"},
            "score_after": {k: v for k, v in self.score_after.items() if k != "counts"},
            "counts_before": self.counts_before, "counts_after": self.counts_after,
            "params": self.p.to_dict(), "minutes": float(self.minutes), "seed": int(self.seed),
            "device": str(self.dev), "seconds": self.seconds,
        }
        if abs(self.factor - 1.0) > 1e-6:
            d = self.d_user
            doc["note"] = (f"trained at {self.s:g} px cells; count the images with diameter={d:.3g} "
                           f"(cellsynth count IMAGE --model DIR --diameter {d:.3g})")
        return doc
