"""DiffStain virtual staining: NSC masks, simulated paired data, the conditional
diffusion pipeline with mask guidance, training and evaluation.

Importing this package is cheap (numpy, scipy, scikit-image); the names backed
by torch/diffusers (:class:`StainPipeline`, :func:`train_stain`,
:func:`load_stain_model`, ...) are imported on first use.
"""

from __future__ import annotations

import importlib

from .nsc import NSCResult, cosine_affinity, nsc_channels, nsc_masks, spectral_embedding, synchronise_labels
from .params import BACKBONES, PRESETS, NSCParams, StainParams, stain_preset

_LAZY = {
    "FilterBankBackbone": ".features",
    "Dinov2Backbone": ".features",
    "TimmDinoBackbone": ".features",
    "make_backbone": ".features",
    "simulate_stain_pair": ".simulate",
    "simulate_stain_pairs": ".simulate",
    "StainPair": ".simulate",
    "StainDataset": ".data",
    "read_stain_dataset": ".data",
    "write_stain_pair": ".data",
    "StainModelConfig": ".model",
    "build_unet": ".model",
    "load_stain_model": ".pipeline_stain",
    "save_stain_model": ".model",
    "default_model_dir": ".model",
    "StainPipeline": ".pipeline_stain",
    "StainOutput": ".pipeline_stain",
    "TrainConfig": ".train",
    "train_stain": ".train",
    "stain_metrics": ".metrics",
    "evaluate_stain": ".metrics",
}

__all__ = [
    "BACKBONES",
    "PRESETS",
    "NSCParams",
    "NSCResult",
    "StainParams",
    "stain_preset",
    "cosine_affinity",
    "nsc_channels",
    "nsc_masks",
    "spectral_embedding",
    "synchronise_labels",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
