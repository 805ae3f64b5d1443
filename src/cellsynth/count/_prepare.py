"""The one-time ONNX export of a counter, run in a separate process by the napari docks.

``python -m cellsynth.count._prepare MODEL`` loads the counter and exports its
network for onnxruntime into the export cache (nothing when it is cached).
"""

from __future__ import annotations

import sys

from . import engines
from .models import load_counter

__all__ = ["prepare"]


def prepare(model: str) -> str:
    """Make sure the export of ``model`` (a counter name or path) is cached; ``"cached"`` or ``"exported"``.

    Run in a separate process (``python -m cellsynth.count._prepare MODEL``)
    by the napari docks when they open, so that the one-time export (building
    the network and tracing it, most of a first count) neither holds the
    window's interpreter nor waits for the first click on Count. Nothing is
    done when counting does not run on onnxruntime here (``"not used"``) or
    exports are kept in memory only (``"not kept"``).
    """
    if engines.onnx_cache_dir() is None:  # exports kept in memory only: this process's would be lost
        return "not kept"
    try:
        if engines.resolve_engine(None, "cpu") != "onnxruntime":
            return "not used"
    except ValueError:  # a bad CELLSYNTH_ENGINE: the count itself says so
        return "not used"
    counter = load_counter(model, device="cpu")
    if counter.kind == "classic":
        return "cached"
    if not counter.network_built and counter.extra.get("onnx_runner"):
        return "cached"
    engines.session_for(counter)
    return "exported"


if __name__ == "__main__":  # pragma: no cover - run by the napari docks in a separate process
    if len(sys.argv) == 2:
        print(prepare(sys.argv[1]))
