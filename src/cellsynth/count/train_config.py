"""The settings of :func:`~cellsynth.count.train.train_counter` (checked once) and what it returns."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .models import Counter

__all__ = ["TrainConfig", "TrainResult", "STRATEGIES"]

STRATEGIES = ("supervised", "finetune", "dual", "cutmix", "pseudo-label")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a counter training run needs, validated once.

    Parameters
    ----------
    kind : {"density", "regression"}
        Density map (points) or the paper's scalar count head.
    strategy : {"supervised", "finetune", "dual", "cutmix", "pseudo-label"}
    backbone : str
        timm EfficientNet name (``pretrained=False``).
    blocks : int
        Backbone blocks kept by density counters.
    epochs : int
        Epochs in total (including ``pretrain_epochs``).
    pretrain_epochs : int
        ``finetune``: epochs on synthetic data first.
    steps_per_epoch : int or None
        Batches per epoch; None: enough to see each labelled image about once.
    batch_size : int
    crop : int
        Training crop side, a multiple of 32.
    lr : float
        Adam learning rate (paper: 1e-4).
    lr_step, lr_gamma : int, float
        Step decay (paper: x0.1 every 10 epochs); ``lr_step=0`` disables it.
    weight_decay : float
    val_fraction : float
        Share of the labelled images held out for validation when no validation set is given.
    cutmix_p, cutmix_alpha : float
        CutMix probability and Beta parameter.
    ema : float
        ``pseudo-label``: teacher EMA decay.
    diameter : float
        Cell diameter in pixels at the training scale (stored with the model).
    sigma, density_scale : float
        Density targets: Gaussian width and mass per cell.
    seed : int
    pretrained : str or None
        Initialise a new counter's backbone from ImageNet weights (``"imagenet"``:
        the registry's ``efficientnet_b0-imagenet``, resolved by
        :func:`cellsynth.weights.resolve`: a local folder, the hub cache, or a
        download unless offline) or from a weights file or folder given by path,
        as the paper does. None: random initialisation. Ignored with ``init``.

    Examples
    --------
    >>> TrainConfig(strategy="dual").batch_size
    16
    >>> TrainConfig(strategy="mixup")
    Traceback (most recent call last):
    ...
    ValueError: strategy must be one of ('supervised', 'finetune', 'dual', 'cutmix', 'pseudo-label'), got 'mixup'
    """

    kind: str = "density"
    strategy: str = "supervised"
    backbone: str = "efficientnet_b0"
    blocks: int = 4
    epochs: int = 50
    pretrain_epochs: int = 0
    steps_per_epoch: Optional[int] = None
    batch_size: int = 16
    crop: int = 256
    lr: float = 1e-4
    lr_step: int = 10
    lr_gamma: float = 0.1
    weight_decay: float = 0.0
    val_fraction: float = 0.2
    cutmix_p: float = 0.5
    cutmix_alpha: float = 1.0
    ema: float = 0.99
    diameter: float = 15.0
    sigma: float = 2.5
    density_scale: float = 100.0
    seed: int = 0
    pretrained: Optional[str] = None

    def __post_init__(self) -> None:
        if self.kind not in ("density", "regression"):
            raise ValueError(f"kind must be 'density' or 'regression', got {self.kind!r}")
        if self.strategy == "dacs":
            raise ValueError(
                "strategy 'dacs' is ambiguous: the paper's 'DACS + CutMix' row is 'cutmix' (CutMix between "
                "labelled domains); EMA-teacher pseudo-labelling of unlabelled images is 'pseudo-label'"
            )
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        _check_backbone(self.backbone)
        if self.strategy == "pseudo-label" and self.kind != "density":
            raise ValueError("strategy 'pseudo-label' needs a density counter (pseudo-labels are cell positions)")
        for name in ("epochs", "batch_size", "blocks"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if int(self.pretrain_epochs) != self.pretrain_epochs or not 0 <= self.pretrain_epochs < self.epochs:
            raise ValueError(f"pretrain_epochs must be an integer in [0, epochs), got {self.pretrain_epochs!r}")
        if self.steps_per_epoch is not None and (int(self.steps_per_epoch) != self.steps_per_epoch or self.steps_per_epoch < 1):
            raise ValueError(f"steps_per_epoch must be a positive integer or None, got {self.steps_per_epoch!r}")
        if int(self.crop) != self.crop or self.crop < 32 or self.crop % 32:
            raise ValueError(f"crop must be a positive multiple of 32, got {self.crop!r}")
        if self.strategy in ("dual", "cutmix") and self.batch_size < 2:
            raise ValueError(f"strategy {self.strategy!r} needs batch_size >= 2, got {self.batch_size}")
        for name in ("lr", "diameter", "sigma", "density_scale", "cutmix_alpha"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("cutmix_p", "lr_gamma"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {self.ema!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.lr_step < 0 or self.weight_decay < 0:
            raise ValueError(f"lr_step and weight_decay must be >= 0, got {self.lr_step!r}, {self.weight_decay!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_backbone(name: str) -> None:
    """Refuse a backbone timm does not know, naming the close ones (timm itself raises a RuntimeError later)."""
    import timm

    if not isinstance(name, str) or not timm.is_model(name):
        import difflib

        near = difflib.get_close_matches(name, timm.list_models(), n=3) if isinstance(name, str) else []
        hint = f"; close names: {', '.join(near)}" if near else ""
        raise ValueError(f"backbone {name!r} is not a timm model; expected e.g. 'efficientnet_b0' (the default) or "
                         f"'test_efficientnet'{hint}")


@dataclass
class TrainResult:
    """What :func:`train_counter` returns: the best counter, the history and where it was saved."""

    counter: Counter
    history: list = field(default_factory=list)
    best: dict = field(default_factory=dict)
    path: Optional[Path] = None
