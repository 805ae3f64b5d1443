"""Parameters of InST stylization and style-token training (no torch import)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = ["StylizeParams", "TrainParams", "RESIZE_MODES", "CLIP_INPUTS", "INST_SCHEDULERS"]

RESIZE_MODES = ("keep", "squash")
INST_SCHEDULERS = ("ddim", "dpmsolver++", "unipc")
CLIP_INPUTS = ("proper", "official-quirk")


def _check_range(obj, name: str, low: float, high: float) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value <= high):
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")


def _check_int(obj, name: str, low: int, high: int) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or int(value) != value or not (low <= value <= high):
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    object.__setattr__(obj, name, int(value))


@dataclass(frozen=True)
class StylizeParams:
    """Settings of one InST stylization.

    Parameters
    ----------
    strength : float
        Fraction of the diffusion run that is redone: the stochastic inversion
        happens at ``t = int(1000 * strength)`` and DDIM runs the last
        ``int(steps * strength)`` steps. 0 returns the VAE reconstruction.
    num_inference_steps : int
        DDIM steps of a full run (the last ``int(steps * strength)`` are run).
    guidance_scale : float
        Classifier-free guidance weight (1 disables the unconditional branch).
    size : int
        Long side of the working image in pixels (the official code uses 512);
        0 works at the content's own size. A multiple of 8 is used.
    resize : {"keep", "squash"}
        ``"keep"`` keeps the aspect ratio and pads to multiples of 8;
        ``"squash"`` resizes to ``size x size`` as the official code does.
    adain : bool
        Match the content latent's per-channel mean/std to the style latent's.
    seed : int
        Seed of the inversion noise.
    scheduler : {"ddim", "dpmsolver++", "unipc"}
        The sampler: the paper's DDIM (50 steps), or a multistep solver of
        diffusers (DPM-Solver++ or UniPC) that reaches DDIM-50 quality in about 20.

    Examples
    --------
    >>> StylizeParams(strength=0.7).num_inference_steps
    50
    >>> StylizeParams(resize="crop")
    Traceback (most recent call last):
    ...
    ValueError: resize must be one of 'keep', 'squash', got 'crop'
    """

    strength: float = field(default=0.7,
                            metadata={"help": "how much of the diffusion run is redone", "low": 0.0, "high": 1.0})
    num_inference_steps: int = field(default=50, metadata={"help": "DDIM steps of a full run", "low": 1, "high": 500})
    guidance_scale: float = field(default=10.0,
                                  metadata={"help": "classifier-free guidance weight", "low": 1.0, "high": 50.0})
    size: int = field(default=512,
                      metadata={"help": "long side of the working image (0: native)", "low": 0, "high": 4096})
    resize: str = field(default="keep", metadata={"help": "keep aspect ratio (pad) or squash to size x size"})
    adain: bool = field(default=True, metadata={"help": "latent AdaIN to the style statistics"})
    seed: int = field(default=0, metadata={"help": "seed of the inversion noise", "low": 0, "high": 2**31 - 1})
    scheduler: str = field(default="ddim", metadata={"help": "sampler: 'ddim' (the paper, 50 steps) or the "
                                                     "few-step 'dpmsolver++' / 'unipc' (about 20 steps)"})

    def __post_init__(self) -> None:
        if self.scheduler not in INST_SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(map(repr, INST_SCHEDULERS))}, "
                             f"got {self.scheduler!r}")
        _check_range(self, "strength", 0.0, 1.0)
        _check_int(self, "num_inference_steps", 1, 500)  # with steps_offset 1, more steps would reach t = 1000
        _check_range(self, "guidance_scale", 1.0, 50.0)
        _check_int(self, "size", 0, 4096)
        if self.size and self.size < 8:
            raise ValueError(f"size must be 0 or at least 8, got {self.size}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of 'keep', 'squash', got {self.resize!r}")
        if self.resize == "squash" and not self.size:
            raise ValueError("resize='squash' needs size > 0")
        if not isinstance(self.adain, bool):
            raise TypeError(f"adain must be a bool, got {type(self.adain).__name__}")
        _check_int(self, "seed", 0, 2**63 - 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainParams:
    """Settings of style-token training (only the mapper trains).

    Parameters
    ----------
    steps : int
        Optimiser steps (batch 1). The microscopy paper used 1000 per token.
    learning_rate : float
        AdamW learning rate (official 1e-4, weight decay 0.01).
    weight_decay : float
        AdamW weight decay.
    size : int
        Side of the square training image (official 512).
    flip : bool
        Random horizontal flips (both flips are encoded once and cached).
    cache : bool
        Encode VAE latents and CLIP embeddings once; False re-encodes each step.
    clip_input : {"proper", "official-quirk"}
        How the style image is given to CLIP; new tokens use ``"proper"``.
    checkpoint_every : int
        Save a resumable checkpoint every N steps (0: never).
    mixed_precision : bool
        bf16 (or fp16) autocast on CUDA; ignored on CPU.
    seed : int
        Seed of the mapper initialisation, noise, timesteps and flips.

    Examples
    --------
    >>> TrainParams().steps, TrainParams().learning_rate
    (1000, 0.0001)
    """

    steps: int = field(default=1000, metadata={"help": "optimiser steps (batch 1)", "low": 1, "high": 100000})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate", "low": 1e-7, "high": 1.0})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay", "low": 0.0, "high": 1.0})
    size: int = field(default=512, metadata={"help": "side of the square training image", "low": 8, "high": 2048})
    flip: bool = field(default=True, metadata={"help": "random horizontal flips"})
    cache: bool = field(default=True, metadata={"help": "encode latents and CLIP embeddings once"})
    clip_input: str = field(default="proper", metadata={"help": "'proper' or 'official-quirk' CLIP input"})
    checkpoint_every: int = field(default=100,
                                  metadata={"help": "checkpoint every N steps (0: never)", "low": 0, "high": 100000})
    mixed_precision: bool = field(default=True, metadata={"help": "bf16/fp16 autocast on CUDA"})
    seed: int = field(default=0, metadata={"help": "training seed", "low": 0, "high": 2**31 - 1})

    def __post_init__(self) -> None:
        _check_int(self, "steps", 1, 10**6)
        _check_range(self, "learning_rate", 1e-9, 1.0)
        _check_range(self, "weight_decay", 0.0, 1.0)
        _check_int(self, "size", 8, 4096)
        if self.size % 8:
            raise ValueError(f"size must be a multiple of 8, got {self.size}")
        _check_int(self, "checkpoint_every", 0, 10**6)
        _check_int(self, "seed", 0, 2**63 - 1)
        if self.clip_input not in CLIP_INPUTS:
            raise ValueError(f"clip_input must be one of {CLIP_INPUTS}, got {self.clip_input!r}")
        for name in ("flip", "cache", "mixed_precision"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
