"""What label-free adaptation and retraining from corrections share: settings, result, input checks,
the base counter, the images at the working scale, counting, and writing the kept counter."""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..progress import report
from ._output import REPORT_FILE, write_counter_folder

__all__ = ["AdaptParams", "AdaptResult", "Steps", "check_images", "check_budget", "load_base", "working_planes",
           "count_images", "finish"]


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
        Adaptation: the working scale is the user's diameter clipped to
        ``[base / span, base * span]`` (retraining works at the base's own scale).
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


class Steps:
    """One run of a loop, step by step: its settings, the time each step took, and the time left for training."""

    def __init__(self, *, p: AdaptParams, progress, seed: int, minutes: float) -> None:
        self.p, self.progress, self.seed, self.minutes = p, progress, seed, minutes
        self.t_start = self._t = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def restart(self) -> None:
        """Time the next step from now (input checks are not a step)."""
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._t, 2)
        self._t = now

    def budget_left(self) -> float:
        """Seconds left for training: the budget less what ran and enough for the check, counts and write after."""
        reserve = 2.0 * (self.seconds["count_before"] + self.seconds["check_before"]) + 5.0
        return max(0.0, self.minutes * 60.0 - (time.perf_counter() - self.t_start) - reserve)

    def conclude(self, candidate, diameter, *, out, overwrite: bool) -> "AdaptResult":
        """Count with the kept counter, write the counter and its report (with ``out``); the result."""
        kept = candidate if self.accepted else self.base
        self.counts_after = (count_images(self.imgs, kept, self.d_user, self.progress, "count after")
                             if self.accepted else list(self.counts_before))
        self.lap("count_after")
        doc = self.report_doc(diameter)
        self.config["training"] = doc
        counter, path = finish(base=self.base, candidate=candidate, net=self.net, accepted=self.accepted,
                               config=self.config, out=out, overwrite=overwrite, report_doc=doc)
        self.seconds["total"] = round(time.perf_counter() - self.t_start, 2)
        if path is not None:  # the report beside the model also gets the total time
            from .. import io

            io.write_json(Path(path) / REPORT_FILE, doc, overwrite=True)
        return AdaptResult(counter=counter, path=path, accepted=self.accepted, report=doc,
                           counts_before=self.counts_before, counts_after=self.counts_after)
