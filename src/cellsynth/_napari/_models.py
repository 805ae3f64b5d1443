"""Counters made in napari (adapted, retrained): where they are saved and the list the widgets offer.

Each counter is a folder (``model.safetensors`` + ``config.json`` + ``adapt_report.json``)
under ``models_dir()``; ``models.json`` next to it lists them, newest first, so that
the Count cells widget offers them in its model list after a restart too.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Optional

from qtpy.QtCore import QObject, Signal

__all__ = ["data_dir", "models_dir", "new_model_dir", "recent_models", "remember_model", "registry_events"]

_MAX_ENTRIES = 30


def data_dir() -> Path:
    """Folder for data made in napari: ``$CELLSYNTH_DATA_DIR`` or the platform's user data folder."""
    env = os.environ.get("CELLSYNTH_DATA_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("cellsynth"))


def models_dir() -> Path:
    return data_dir() / "models"


def _registry_path() -> Path:
    return data_dir() / "models.json"


def new_model_dir(image_name: str, kind: str) -> Path:
    """A folder that does not exist yet: ``models_dir()/<image>-<kind>-<YYYYmmdd-HHMMSS>[-N]``."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", image_name).strip("._") or "image"
    base = models_dir() / f"{stem[:60]}-{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, i = base, 2
    while path.exists():
        path = base.with_name(f"{base.name}-{i}")
        i += 1
    return path


def _read() -> list:
    try:
        entries = json.loads(_registry_path().read_text())
    except (OSError, ValueError):
        return []
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("path"), str)] \
        if isinstance(entries, list) else []


def recent_models() -> list[dict]:
    """Counters made here whose folder still exists, newest first: dicts with name, path, kind, image."""
    return [e for e in _read() if (Path(e["path"]) / "model.safetensors").is_file()]


def remember_model(path, *, kind: str, image: str, accepted: Optional[bool] = None,
                   counts_before: Optional[list] = None, counts_after: Optional[list] = None) -> dict:
    """Add a saved counter to the list (newest first) and tell open widgets."""
    from ..io import write_json

    path = Path(path)
    entry = {"name": path.name, "path": str(path), "kind": kind, "image": image,
             "made": time.strftime("%Y-%m-%d %H:%M:%S"), "accepted": accepted,
             "counts_before": list(counts_before or []), "counts_after": list(counts_after or [])}
    entries = [entry] + [e for e in _read() if e["path"] != str(path)]
    try:
        write_json(_registry_path(), entries[:_MAX_ENTRIES], overwrite=True)
    except (OSError, ValueError):
        pass  # the list is a convenience; the counter itself is saved
    registry_events.changed.emit()
    return entry


class _RegistryEvents(QObject):
    changed = Signal()


registry_events = _RegistryEvents()
