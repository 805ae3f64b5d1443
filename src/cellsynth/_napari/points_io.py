"""Reader and writer contributions for points CSV files (counts and annotations)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from .. import io

__all__ = ["get_points_reader", "write_points"]


def _looks_like_points_csv(path: Path) -> bool:
    try:
        with open(path, newline="") as fh:
            header = fh.readline().lower().replace(" ", "").strip().split(",")
    except OSError:
        return False
    return ("row" in header and "col" in header) or ("y" in header and "x" in header)


def get_points_reader(path: Any) -> Optional[callable]:
    """Return a reader for a points CSV (``row,col[,plane]`` or ``x,y`` header), else None."""
    if isinstance(path, list):
        return None
    p = Path(path)
    if p.suffix.lower() != ".csv" or not p.is_file() or not _looks_like_points_csv(p):
        return None
    return _read_points


def _read_points(path: Any) -> list:
    p = Path(path)
    points, features = io.read_points_csv(p)
    kwargs: dict[str, Any] = {"name": p.stem, "metadata": {"cellsynth": {"source_file": str(p)}}}
    if features:
        kwargs["features"] = {k: np.asarray(v) for k, v in features.items()}
    return [(points, kwargs, "points")]


def write_points(path: str, data: Any, attributes: dict) -> list[str]:
    """Write one Points layer as CSV: pixel and world coordinates plus every feature column.

    Nothing is overwritten silently: napari asks before saving over a file, and the
    write itself is atomic.
    """
    feats = attributes.get("features")
    features = {} if feats is None else {str(c): np.asarray(feats[c]) for c in getattr(feats, "columns", feats)}
    out = io.write_points_csv(
        path,
        np.asarray(data, dtype=float).reshape(-1, np.shape(data)[-1] if np.size(data) else 2),
        features=features,
        scale=attributes.get("scale"),
        translate=attributes.get("translate"),
        overwrite=True,
    )
    return [str(out)]
