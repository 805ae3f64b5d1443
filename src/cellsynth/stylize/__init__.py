"""InST stylization: latent AdaIN, style tokens, the InST pipeline, token training, batch runs.

Importing this package is cheap: only the parameter dataclasses and numpy
helpers load eagerly; the torch-based names (pipeline, mapper, tokens,
training) are imported on first access.
"""

from __future__ import annotations

import importlib

from .adain import channel_stats, latent_adain
from .params import StylizeParams, TrainParams

_LAZY = {
    "InSTPipeline": "pipeline_inst",
    "InSTOutput": "pipeline_inst",
    "inst_scheduler": "pipeline_inst",
    "start_timesteps": "pipeline_inst",
    "StyleMapper": "mapper",
    "StyleToken": "tokens",
    "save_token": "tokens",
    "load_token": "tokens",
    "inject_token": "tokens",
    "import_official_token": "official",
    "read_token": "official",
    "train_token": "train",
    "TrainResult": "train",
    "token_loss": "train",
    "load_pipeline": "loading",
    "stylize_dataset": "dataset",
    "count_drift": "dataset",
    "tiny_components": "tiny",
    "tiny_pipeline": "tiny",
    "tiny_token": "tiny",
}

__all__ = ["StylizeParams", "TrainParams", "channel_stats", "latent_adain", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
