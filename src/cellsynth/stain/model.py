"""The staining model: a diffusers ``UNet2DModel`` whose input is the brightfield
condition planes concatenated with the noisy target channels, its configuration,
intensity normalisation, and loading/saving as safetensors + JSON.

Noise level: the network receives the standard integer diffusion timestep
through UNet2DModel's sinusoidal embedding (the public DiffStain code feeds the
continuous abar "gamma" instead; with a fixed training schedule the two carry the
same information). The default configuration follows the paper's code (base 64
channels, multipliers 1-2-4-8, 2 residual blocks, dropout 0.2, GroupNorm 32,
scale-shift time conditioning, attention only in the middle block, linear betas
1e-6 -> 0.01 over 2000 steps).

Intensities: each condition plane and target channel is clipped to its 2nd-98th
percentile (measured on the training set), scaled to [0, 1], then z-scored with
the training mean and standard deviation; all numbers live in ``config.json``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .. import io

__all__ = [
    "StainModelConfig", "build_unet", "save_stain_model", "default_model_dir",
    "normalise", "denormalise", "DEFAULT_COLORMAPS",
]

#: Colormaps by channel name (others get a cycle of these).
DEFAULT_COLORMAPS = {"DNA": "blue", "ER": "green", "RNA": "cyan", "AGP": "red", "Mito": "magenta"}
_CYCLE = ("blue", "green", "cyan", "red", "magenta", "yellow", "gray")
FORMAT = "cellsynth.stain-model"


@dataclass
class StainModelConfig:
    """Everything needed to rebuild a staining model and use it.

    Attributes
    ----------
    brightfield_names, channel_names : list of str
        Condition planes and target channels, in order.
    sample_size : int
        Training crop size; the default tile size of inference.
    block_out_channels, layers_per_block, dropout, norm_num_groups, attention_head_dim
        UNet2DModel settings (attention in the middle block only).
    num_train_timesteps, beta_start, beta_end, beta_schedule, prediction_type
        The noise schedule and what the network predicts ('epsilon', 'sample' or
        'v_prediction').
    condition_norm, target_norm : dict
        Per-plane / per-channel ``low``, ``high`` (2nd/98th percentiles), ``mean``, ``std``.
    mask_levels : list of [float, float]
        Per channel, model-space values of background and foreground (mean
        normalised intensity below / above Otsu's threshold on the training set);
        a 0/1 mask ``m`` becomes ``low + m (high - low)`` for mask guidance.
    colormaps : list of str
    """

    brightfield_names: list = field(default_factory=lambda: ["z-1", "z0", "z+1"])
    channel_names: list = field(default_factory=lambda: ["DNA", "ER", "RNA", "AGP", "Mito"])
    sample_size: int = 64
    block_out_channels: list = field(default_factory=lambda: [64, 128, 256, 512])
    layers_per_block: int = 2
    dropout: float = 0.2
    norm_num_groups: int = 32
    attention_head_dim: int = 8
    num_train_timesteps: int = 2000
    beta_start: float = 1e-6
    beta_end: float = 0.01
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    condition_norm: dict = field(default_factory=dict)
    target_norm: dict = field(default_factory=dict)
    mask_levels: list = field(default_factory=list)
    colormaps: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.brightfield_names or not self.channel_names:
            raise ValueError("a staining model needs at least one brightfield plane and one channel")
        if self.prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon', 'sample' or 'v_prediction', got {self.prediction_type!r}")
        chans = self.block_out_channels
        if not isinstance(chans, (list, tuple)) or not chans or not all(
                isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c > 0 for c in chans):
            raise ValueError(f"block_out_channels must be a list of positive whole numbers, got {chans!r}")
        for name, low in (("layers_per_block", 1), ("norm_num_groups", 1), ("attention_head_dim", 1),
                          ("num_train_timesteps", 2)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise ValueError(f"{name} must be a whole number >= {low}, got {v!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if any(int(c) % int(self.norm_num_groups) for c in self.block_out_channels):
            raise ValueError(f"block_out_channels {self.block_out_channels} must be multiples of norm_num_groups "
                             f"({self.norm_num_groups})")
        if self.sample_size % self.factor:
            raise ValueError(f"sample_size ({self.sample_size}) must be a multiple of {self.factor}")
        if not self.colormaps:
            self.colormaps = [DEFAULT_COLORMAPS.get(n, _CYCLE[i % len(_CYCLE)]) for i, n in enumerate(self.channel_names)]
        for key, count in (("condition_norm", len(self.brightfield_names)), ("target_norm", len(self.channel_names))):
            norm = getattr(self, key)
            if not norm:
                setattr(self, key, {"low": [0.0] * count, "high": [1.0] * count, "mean": [0.0] * count,
                                    "std": [1.0] * count})
            elif any(len(norm[s]) != count for s in ("low", "high", "mean", "std")):
                raise ValueError(f"{key} needs low/high/mean/std lists of length {count}")
            elif not all(np.all(np.isfinite(np.asarray(norm[s], float))) for s in ("low", "high", "mean", "std")):
                raise ValueError(f"{key} must hold finite numbers, got {norm}")
        if not self.mask_levels:
            self.mask_levels = [[-1.0, 1.0]] * len(self.channel_names)

    @property
    def n_condition(self) -> int:
        return len(self.brightfield_names)

    @property
    def n_target(self) -> int:
        return len(self.channel_names)

    @property
    def factor(self) -> int:
        """Image sides must be multiples of this (one halving per down block)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StainModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def scheduler_config(self) -> dict:
        return {"num_train_timesteps": self.num_train_timesteps, "beta_start": self.beta_start,
                "beta_end": self.beta_end, "beta_schedule": self.beta_schedule,
                "prediction_type": self.prediction_type, "clip_sample": False}


def build_unet(config: StainModelConfig):
    """A fresh (randomly initialised) ``UNet2DModel`` for ``config``.

    Examples
    --------
    >>> cfg = StainModelConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=8, sample_size=16)
    >>> unet = build_unet(cfg)
    >>> unet.config.in_channels, unet.config.out_channels
    (8, 5)
    """
    from diffusers import UNet2DModel

    n = len(config.block_out_channels)
    return UNet2DModel(
        sample_size=config.sample_size,
        in_channels=config.n_condition + config.n_target,
        out_channels=config.n_target,
        block_out_channels=tuple(int(c) for c in config.block_out_channels),
        layers_per_block=config.layers_per_block,
        down_block_types=("DownBlock2D",) * n,
        up_block_types=("UpBlock2D",) * n,
        mid_block_type="UNetMidBlock2D",
        add_attention=True,
        attention_head_dim=config.attention_head_dim,
        dropout=config.dropout,
        norm_num_groups=config.norm_num_groups,
        resnet_time_scale_shift="scale_shift",
        num_train_timesteps=config.num_train_timesteps,
    )


def normalise(data: np.ndarray, norm: dict) -> np.ndarray:
    """Raw (P, M, N) intensities -> model space: percentile clip to [0, 1], then z-score.

    Examples
    --------
    >>> x = normalise(np.array([[[0.0, 5.0, 20.0]]]), {"low": [0], "high": [10], "mean": [0.5], "std": [0.5]})
    >>> x.tolist()
    [[[-1.0, 0.0, 1.0]]]
    """
    unit = to_unit(data, norm)
    mean = np.asarray(norm["mean"], np.float32)[:, None, None]
    std = np.asarray(norm["std"], np.float32)[:, None, None]
    return ((unit - mean) / std).astype(np.float32)


def to_unit(data: np.ndarray, norm: dict) -> np.ndarray:
    """Raw (P, M, N) intensities -> [0, 1] by the stored percentiles."""
    x = np.asarray(data, dtype=np.float32)
    if x.ndim != 3 or x.shape[0] != len(norm["low"]):
        raise ValueError(f"expected {len(norm['low'])} planes of shape (M, N), got an array of shape {x.shape}")
    low = np.asarray(norm["low"], np.float32)[:, None, None]
    high = np.asarray(norm["high"], np.float32)[:, None, None]
    return np.clip((x - low) / np.maximum(high - low, 1e-12), 0.0, 1.0)


def denormalise(z: np.ndarray, norm: dict) -> np.ndarray:
    """Model space -> [0, 1] normalised intensity (clipped)."""
    mean = np.asarray(norm["mean"], np.float32)[:, None, None]
    std = np.asarray(norm["std"], np.float32)[:, None, None]
    return np.clip(np.asarray(z, np.float32) * std + mean, 0.0, 1.0)


def default_model_dir() -> Path:
    """The shipped demo model (``resources/models/stain-demo``)."""
    from ..weights import resources_dir

    return resources_dir() / "models" / "stain-demo"


def _check_finite(state: dict, what: str) -> None:
    """Refuse weights holding NaN or infinite values (they stain every pixel NaN or black)."""
    import torch

    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{what} is not finite: NaN or infinite values in {len(bad)} tensors "
                         f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")


def save_stain_model(unet, config: StainModelConfig, out: os.PathLike | str, *, dtype: str = "float32",
                     extra: Optional[dict] = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (atomically) to ``out``.

    Parameters
    ----------
    dtype : {"float32", "float16"}
        Storage precision of the weights (loading always gives float32 on CPU).
    extra : dict, optional
        Stored under ``"training"`` in config.json (data, time, metrics).
    """
    import torch
    from safetensors.torch import save_file

    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tdtype = getattr(torch, dtype)
    state = {k: v.detach().to("cpu", tdtype).contiguous() for k, v in unet.state_dict().items()}
    _check_finite(state, f"the model to save in {out}")
    with io.atomic_path(out / "model.safetensors", overwrite=True) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    doc = {"format": FORMAT, "version": 1, "config": config.to_dict(), "dtype": dtype}
    if extra:
        doc["training"] = extra
    io.write_json(out / "config.json", doc, overwrite=True)
    return out
