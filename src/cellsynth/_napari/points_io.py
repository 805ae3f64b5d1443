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
    kwargs: dict[str, Any] = {"name": p.stem, "metadata": {"cellsynth": {"source_file": str(p)}},
                              # rings, not filled discs: the nuclei stay visible under the points
                              "face_color": "transparent", "border_width": 0.12, "border_width_is_relative": True,
                              "border_color": "yellow"}
    if features:
        kwargs["features"] = {k: np.asarray(v) for k, v in features.items()}
        if "source" in features:  # counted points: yellow from the model, cyan added by hand
            from ._counting import COLORS

            kwargs.update(border_color="source", border_color_cycle=COLORS)
    transform = world_transform(p, points)
    if transform is not None:
        kwargs["scale"], kwargs["translate"] = transform
    return [(points, kwargs, "points")]


def world_transform(path: Path, points: np.ndarray) -> Optional[tuple[tuple, tuple]]:
    """``(scale, translate)`` that map the pixel columns of a points CSV onto its world columns.

    The writer stores both (``row``/``col`` and ``row_world``/``col_world``, the latter
    also as napari's ``axis-0``/``axis-1``, used when the ``*_world`` columns are absent); fitting
    ``world = pixel * scale + translate`` per axis gives the points back their place next
    to the image they were counted in. An axis whose pixel values do not vary keeps scale 1
    (its translate still puts the points at their world position). None without world columns.
    """
    import csv

    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    header = [h.strip().lower() for h in rows[0]] if rows else []
    names = (["plane"] if points.shape[1] == 3 else []) + ["row", "col"]
    cols = [header.index(f"{n}_world") if f"{n}_world" in header else -1 for n in names]
    if min(cols) < 0:
        axes = [f"axis-{k}" for k in range(len(names))]
        cols = [header.index(a) if a in header else -1 for a in axes]
    if len(points) == 0 or min(cols) < 0:
        return None
    body = [r for r in rows[1:] if any(c.strip() for c in r)]
    try:
        world = np.array([[float(r[c]) for c in cols] for r in body], dtype=float)
    except (ValueError, IndexError):
        return None
    if world.shape != points.shape or not np.all(np.isfinite(world)):
        return None
    scale, translate = [], []
    for k in range(points.shape[1]):
        x, y = points[:, k], world[:, k]
        s = 1.0
        if np.ptp(x) > 0:
            s = float(np.polyfit(x, y, 1)[0])
            if not np.isfinite(s) or s <= 0:
                return None
        scale.append(s)
        translate.append(float(np.mean(y - s * x)))
    return tuple(scale), tuple(translate)


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
    layer_record(out, attributes.get("metadata") or {}, scale=attributes.get("scale"))
    return [str(out)]


def layer_record(out, metadata: dict, *, scale=None, operation: str = "export points") -> Path:
    """Write ``out``'s provenance sidecar from a layer's ``metadata["cellsynth"]`` (what made the layer: model,
    weights hash, parameters, diameter, input layer), with the layer's pixel size."""
    from .._provenance import record, write_sidecar

    made = dict(metadata.get("cellsynth") or {}) if isinstance(metadata, dict) else {}
    source = made.pop("source_path", None)
    model = {k: made.pop(k) for k in ("model", "kind", "sha256", "path") if k in made} or None
    size = float(scale[-1]) if scale is not None and len(scale) and float(scale[-1]) != 1.0 else None
    return write_sidecar(out, record(operation, inputs=[source] if source else [],
                                     model=model, parameters=made, pixel_size=size, command=None), overwrite=True)
