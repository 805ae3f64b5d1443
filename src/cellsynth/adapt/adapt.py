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
   than the base and is not less consistent on the user's images (else the base
   is returned, ``accepted=False``; see :func:`accept`);
8. count the images with the kept counter, write the report and the counter.

The label-free score (lower is better) is the relative count error on the
held-out stylized layouts (which are labelled) plus half the count
inconsistency under a transpose of the user's images (test-time augmentation)
plus half the disagreement between the number of peaks and the density sum on
the user's images.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..count.counter import CounterConfig
from ..progress import ProgressCallback, report
from ._output import REPORT_FILE, check_out, write_counter_folder
from ._train import Item, crop_item, finetune, forward_density, make_item, peak_count, stack_batch, working_scale
from .fast_style import matched_layouts
from .stats import combine_stats, estimate_image_stats

__all__ = ["AdaptParams", "AdaptResult", "adapt_counter", "label_free_score", "STYLIZE_MODES"]

STYLIZE_MODES = ("auto", "inst", "fast")


@dataclass(frozen=True)
class AdaptParams:
    """Settings of :func:`adapt_counter` and :func:`~cellsynth.adapt.retrain_counter` beyond the budget.

    Parameters
    ----------
    crop : int
        Training crop side at the working scale (a multiple of 32).
    batch_size : int
    lr : float
        Adam learning rate at the start of the cosine decay.
    ema : float
        Teacher EMA decay.
    n_layouts, n_holdout : int
        Stylized layouts for training and held out for the label-free check.
    layout_size : int
        Side of each layout at the working scale.
    mix_share : float
        Share of each adaptation batch made of crops with a user crop pasted in
        (0 disables the pseudo-labels).
    pseudo_threshold : float
        Minimum teacher peak height (fraction of a lone cell's) for a pseudo-label.
    max_steps, min_steps : int
        Bounds on the optimiser steps (the time budget decides in between).
    span : float
        The working scale is the user's diameter clipped to
        ``[base / span, base * span]``.
    margin : float
        The candidate's label-free score must be lower than the base's by this much.
    replay_share : float
        Retraining: share of each batch from stylized synthetic layouts.

    Examples
    --------
    >>> AdaptParams().crop
    128
    >>> AdaptParams(crop=100)
    Traceback (most recent call last):
    ...
    ValueError: crop must be a positive multiple of 32, got 100
    """

    crop: int = 128
    batch_size: int = 8
    lr: float = 5e-4
    ema: float = 0.99
    n_layouts: int = 40
    n_holdout: int = 8
    layout_size: int = 256
    mix_share: float = 0.5
    pseudo_threshold: float = 0.5
    max_steps: int = 5000
    min_steps: int = 3
    span: float = 1.6
    margin: float = 0.0
    replay_share: float = 0.25

    def __post_init__(self) -> None:
        if int(self.crop) != self.crop or self.crop < 32 or self.crop % 32:
            raise ValueError(f"crop must be a positive multiple of 32, got {self.crop!r}")
        for name in ("batch_size", "max_steps", "min_steps", "layout_size"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("n_layouts", "n_holdout"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) must not exceed max_steps ({self.max_steps})")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {self.ema!r}")
        for name in ("mix_share", "pseudo_threshold", "replay_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not self.span >= 1:
            raise ValueError(f"span must be >= 1, got {self.span!r}")
        if not self.margin >= 0:
            raise ValueError(f"margin must be >= 0, got {self.margin!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class AdaptResult:
    """What :func:`adapt_counter` and :func:`~cellsynth.adapt.retrain_counter` return.

    Attributes
    ----------
    counter : cellsynth.count.Counter
        The counter to use, loaded and ready for :func:`~cellsynth.count.count_cells`:
        the adapted one when accepted, else the base.
    path : Path or None
        The folder written (None when ``out`` was None).
    accepted : bool
        Whether the new counter scored better than the base. When False,
        ``counter`` is the base and ``out`` receives a copy of the base with the
        report, so that ``out`` is always a counter that is no worse than the base.
    report : dict
        JSON-able record of what was done (also in ``out/adapt_report.json`` and
        in the saved config's ``training``).
    counts_before, counts_after : list of int
        Points counted per image by the base and by ``counter``.
    """

    counter: Any
    path: Optional[Path]
    accepted: bool
    report: dict = field(default_factory=dict)
    counts_before: list = field(default_factory=list)
    counts_after: list = field(default_factory=list)


# ----------------------------------------------------------------------------- shared steps

def check_images(images) -> list[np.ndarray]:
    """The images as arrays, each with at least one 2D plane; a clear error otherwise."""
    from ..count.preprocess import split_planes

    if isinstance(images, np.ndarray) or not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
        raise TypeError("images must be a sequence (list or tuple) of arrays, one per image")
    if len(images) == 0:
        raise ValueError("images is empty; give at least one image")
    out = []
    for i, im in enumerate(images):
        arr = np.asarray(im)
        if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise TypeError(f"images[{i}] must hold real numbers, got dtype {arr.dtype}")
        planes, _ = split_planes(arr)
        if min(planes.shape[1:]) < 16:
            raise ValueError(f"images[{i}] has planes of {planes.shape[1:]} pixels; expected at least 16x16")
        out.append(arr)
    return out


def check_budget(minutes, seed) -> None:
    if not (isinstance(minutes, (int, float)) and np.isfinite(minutes) and minutes > 0):
        raise ValueError(f"minutes must be a positive number, got {minutes!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def load_base(base, device) -> Any:
    """The base counter (a density counter) on ``device``."""
    from ..count.models import Counter, load_counter

    counter = base if isinstance(base, Counter) else load_counter(base, device=device)
    if counter.kind != "density":
        raise ValueError(f"base must be a density counter (points to adapt), got a {counter.kind} counter")
    return counter


def working_planes(images: Sequence[np.ndarray], config: dict, factor: float) -> list[np.ndarray]:
    """Every plane of every image, normalised with the counter's settings and rescaled by ``factor``."""
    from ..count.preprocess import normalize_image, rescale_plane, split_planes

    norm = config.get("normalize", {})
    out = []
    for im in images:
        planes, _ = split_planes(im)
        for p in planes:
            out.append(rescale_plane(normalize_image(p, low=norm.get("low", 1.0), high=norm.get("high", 99.8)), factor))
    return out


def count_images(images, counter, diameter: float, progress, stage: str) -> list[int]:
    """Number of points per image as :func:`count_cells` gives them.

    PyTorch runs the network here: a candidate's weights change between calls,
    and exporting each state for onnxruntime would cost more than it saves on a
    few images (both engines give the same points).
    """
    from ..count.infer import count_cells

    counts = []
    for i, im in enumerate(images):
        # each tile re-reports this image's step: a Cancel is seen within a tile, not after a whole image
        tick = None if progress is None else (lambda _event, i=i: report(progress, stage, i, len(images)))
        counts.append(int(len(count_cells(im, counter=counter, diameter=diameter, engine="torch",
                                          progress=tick).points)))
        report(progress, stage, i + 1, len(images))
    return counts


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


def accept(before: dict, after: dict, margin: float = 0.0, tolerance: float = 0.0) -> bool:
    """The candidate is kept when it scores better without doing worse on any part that could show it.

    Three conditions: its score is lower by ``margin``; its synthetic error is not
    higher; and its consistency on the user's own images (half the transpose
    inconsistency plus half the peak/density gap) is not worse by more than
    ``tolerance`` (default 0: worse by no measure computed without labels). The held-out stylized layouts are drawn like the training
    layouts, so the synthetic error alone improves with almost any fine-tuning;
    only the user-image terms see the user's images, and a candidate that is less
    consistent there is refused even when its total score is lower.

    Examples
    --------
    >>> base = {"score": 0.3, "synthetic_error": 0.2, "tta_inconsistency": 0.1, "peak_density_gap": 0.1}
    >>> accept(base, {"score": 0.2, "synthetic_error": 0.1, "tta_inconsistency": 0.1, "peak_density_gap": 0.1})
    True
    >>> accept(base, {"score": 0.2, "synthetic_error": 0.25, "tta_inconsistency": 0.0, "peak_density_gap": 0.0})
    False
    >>> accept(base, {"score": 0.25, "synthetic_error": 0.05, "tta_inconsistency": 0.2, "peak_density_gap": 0.2})
    False
    """
    return refusal(before, after, margin, tolerance) is None


def refusal(before: dict, after: dict, margin: float = 0.0, tolerance: float = 0.0) -> Optional[str]:
    """Why :func:`accept` refuses the candidate (one line), or None when it accepts it."""
    if not after["score"] < before["score"] - margin:
        return f"its label-free score is not lower ({before['score']:.3f} -> {after['score']:.3f})"
    if not after["synthetic_error"] <= before["synthetic_error"] + 1e-9:
        return (f"it counts the held-out stylized layouts worse ({before['synthetic_error']:.3f} -> "
                f"{after['synthetic_error']:.3f})")
    if not _user_part(after) <= _user_part(before) + tolerance:
        return (f"it is less consistent on your images (transpose and peak/density checks "
                f"{_user_part(before):.3f} -> {_user_part(after):.3f})")
    return None


def finish(*, base, candidate, net, accepted: bool, config: dict, out, overwrite: bool, report_doc: dict):
    """The counter to return (``candidate`` or ``base``) and, with ``out``, the folder written.

    The folder holds the candidate's float32 weights, or a copy of the base
    (its own config, the report in ``training``) when the candidate was not accepted.
    """
    if accepted:
        kept, save_net, save_cfg = candidate, net, copy.deepcopy(config)
    else:
        kept, save_net = base, base.net
        save_cfg = copy.deepcopy(base.config)
        base_training = save_cfg.pop("training", None)
        save_cfg["training"] = {**report_doc, "base_training": base_training}
    path = None
    if out is not None:
        save_cfg.pop("dtype", None)
        cpu_net = copy.deepcopy(save_net).float().cpu()
        path = write_counter_folder(Path(out), cpu_net, save_cfg, report_doc, overwrite=overwrite)
        kept = dataclasses.replace(kept, path=path, name=str(path) if accepted else kept.name)
    return kept, path


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
    check_budget(minutes, seed)
    out = check_out(out, overwrite)
    mode = resolve_stylize(stylize)
    dev = resolve_device(device)
    t = time.perf_counter()

    # 2. stats
    per_image = []
    for i, im in enumerate(imgs):
        per_image.append(estimate_image_stats(im, diameter=diameter))
        report(progress, "stats", i + 1, len(imgs))
    stats = combine_stats(per_image)
    d_user = stats["diameter"]
    t = lap("stats", t)

    # 3. base counter and working scale
    base_counter = load_base(base, dev)
    d_eff = d_user * base_counter.settings.diameter_scale  # the nuclei as the base's fitted settings see them
    stats = {**stats, "diameter": d_eff}
    s = working_scale(d_eff, base_counter.diameter, p.span)
    factor = s / d_eff
    config = copy.deepcopy(base_counter.config)
    config.pop("training", None)
    config.pop("dtype", None)
    config.update(diameter=s, name="adapted")
    user_planes = working_planes(imgs, config, factor)

    # 4. layouts
    layouts, holdout = _layouts(stats, factor, user_planes, p, mode, seed, progress)
    t = lap("layouts", t)

    # 5. base: counts and label-free score
    counts_before = count_images(imgs, base_counter, d_user, progress, "count before")
    t = lap("count_before", t)
    base_net = copy.deepcopy(base_counter.net).float().to(dev).eval()
    score_before = label_free_score(base_net, config, user_planes, holdout, dev)
    report(progress, "check", 1, 2, "base scored")
    t = lap("check_before", t)

    # 6. fine-tune for the time left, keeping enough for the check, the counts after and the write
    reserve = 2.0 * (seconds["count_before"] + seconds["check_before"]) + 5.0
    train_seconds = max(0.0, minutes * 60.0 - (time.perf_counter() - t_start) - reserve)
    train = [make_item(img, cen, config) for img, cen in layouts]
    user = [Item(pl, None) for pl in user_planes]
    net = copy.deepcopy(base_net).train()
    net, info = finetune(net, _adapt_sampler(train, user, p, config, dev), seconds=train_seconds,
                         max_steps=p.max_steps, min_steps=p.min_steps, lr=p.lr,
                         scale=CounterConfig.of(config).density_scale, device=dev, seed=seed,
                         ema=p.ema if p.mix_share > 0 else None, progress=progress)
    t = lap("train", t)

    # 7. label-free check
    score_after = label_free_score(net, config, user_planes, holdout, dev)
    why_not = refusal(score_before, score_after, p.margin)
    accepted = why_not is None
    report(progress, "check", 2, 2, "accepted" if accepted else "kept the base")
    t = lap("check_after", t)

    # 8. counts with the kept counter, report, write
    from ..count.models import Counter, to_device

    candidate = to_device(Counter(kind="density", name="adapted", config=copy.deepcopy(config),
                                  net=copy.deepcopy(net)), dev)
    kept = candidate if accepted else base_counter
    counts_after = count_images(imgs, kept, d_user, progress, "count after") if accepted else list(counts_before)
    t = lap("count_after", t)
    doc = {
        "operation": "adapt-counter",
        "accepted": accepted,
        "decision": "accepted: a lower label-free score, no worse on any part of it" if accepted else
                    f"kept the base: {why_not}",
        "base": base_counter.describe(),
        "n_images": len(imgs),
        "diameter": {"used": d_user, "given": None if isinstance(diameter, str) else float(diameter),
                     "per_image": [st["diameter"] for st in per_image]},
        "stats": {"combined": stats, "per_image": per_image},
        "working_scale": s,
        "scale_factor": factor,
        "stylization": mode,
        "n_layouts": len(layouts),
        "n_holdout": len(holdout),
        "training": info,
        "score_before": {k: v for k, v in score_before.items() if k != "counts"},
        "score_after": {k: v for k, v in score_after.items() if k != "counts"},
        "counts_before": counts_before,
        "counts_after": counts_after,
        "params": p.to_dict(),
        "minutes": float(minutes),
        "seed": int(seed),
        "device": str(dev),
        "seconds": seconds,
    }
    if abs(factor - 1.0) > 1e-6:
        doc["note"] = (f"trained at {s:g} px cells; count the images with diameter={d_user:.3g} "
                       f"(cellsynth count IMAGE --model DIR --diameter {d_user:.3g})")
    config["training"] = doc
    counter, path = finish(base=base_counter, candidate=candidate, net=net, accepted=accepted, config=config,
                           out=out, overwrite=overwrite, report_doc=doc)
    seconds["total"] = round(time.perf_counter() - t_start, 2)
    if path is not None:  # the report beside the model also gets the total time
        from .. import io

        io.write_json(path / REPORT_FILE, doc, overwrite=True)
    return AdaptResult(counter=counter, path=path, accepted=accepted, report=doc,
                       counts_before=counts_before, counts_after=counts_after)
