"""Reading and writing images (from :mod:`cellsynth._images`), point tables and JSON manifests.

All writes are atomic (a temporary file in the same folder, then a rename: see
:mod:`cellsynth._atomic`), so a crash or a cancel never leaves a half-written
file behind, and no write replaces an existing file unless ``overwrite=True``
is given.

Examples
--------
>>> import numpy as np, tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> write_points_csv(d / "p.csv", np.array([[1.5, 2.0]]), features={"score": [0.9]})
PosixPath('...p.csv')
>>> pts, feats = read_points_csv(d / "p.csv")
>>> pts.tolist(), feats["score"].tolist()
([[1.5, 2.0]], [0.9])
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ._atomic import atomic_path, prepare_output, remove_stale_parts, remove_unfinished
from ._images import is_ome_zarr, read_picture, read_tiff, read_tiff_header, tiff_layout, write_tiff
from ._memory import NotEnoughMemory, first_line, require_memory

__all__ = [
    "atomic_path",
    "remove_stale_parts",
    "remove_unfinished",
    "prepare_output",
    "require_memory",
    "NotEnoughMemory",
    "read_tiff",
    "read_picture",
    "read_tiff_header",
    "tiff_layout",
    "write_tiff",
    "is_ome_zarr",
    "read_points_csv",
    "write_points_csv",
    "read_json",
    "write_json",
    "path_inside",
    "json_default",
    "first_line",
]




def state_dict_mismatch(expected: Mapping[str, Any], given: Mapping[str, Any]) -> str:
    """One line saying how a weights file's tensors differ from those a network expects.

    Examples
    --------
    >>> state_dict_mismatch({"a": np.zeros((2, 3)), "b": np.zeros(1)}, {"a": np.zeros(3), "c": np.zeros(1)})
    '1 tensors missing (e.g. b); 1 unexpected (e.g. c); 1 of the wrong shape (e.g. a: (3,) in the file, (2, 3) expected)'
    """
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shape = [k for k in expected if k in given and tuple(expected[k].shape) != tuple(given[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if shape:
        k = shape[0]
        parts.append(f"{len(shape)} of the wrong shape (e.g. {k}: {tuple(given[k].shape)} in the file, "
                     f"{tuple(expected[k].shape)} expected)")
    return "; ".join(parts) or "the tensors do not match"


# ----------------------------------------------------------------------------- points

_COORDS = ("row", "col", "plane")
_ALIASES = {"y": "row", "x": "col", "z": "plane", "axis-0": None}


def write_points_csv(
    path: os.PathLike | str,
    points: np.ndarray,
    *,
    features: Optional[Mapping[str, Any]] = None,
    scale: Optional[tuple[float, ...]] = None,
    translate: Optional[tuple[float, ...]] = None,
    overwrite: bool = False,
) -> Path:
    """Write points as CSV: ``row, col [, plane]``, world coordinates, features.

    Parameters
    ----------
    points : ndarray of shape (N, 2) or (N, 3)
        Pixel coordinates ``(row, col)`` or ``(plane, row, col)`` (napari's order).
    features : mapping of str to sequence, optional
        Extra columns, each of length N.
    scale, translate : tuple of float, optional
        When given, columns ``row_world``, ``col_world`` (``plane_world``) hold
        ``points * scale + translate``.

    Columns ``axis-0``, ``axis-1`` (, ``axis-2``) repeat the world coordinates
    (the pixel ones without ``scale``/``translate``) under napari's own column
    names, so that napari's built-in reader (``viewer.open(path)`` in a script)
    also opens the file and puts the points where they were, features included.
    """
    pts = np.asarray(points, dtype=float).reshape(-1, np.asarray(points).shape[-1] if np.size(points) else 2)
    if pts.ndim != 2 or pts.shape[1] not in (2, 3):
        raise ValueError(f"points must have shape (N, 2) or (N, 3), got {np.shape(points)}")
    n, d = pts.shape
    names = ["row", "col"] if d == 2 else ["plane", "row", "col"]
    columns: dict[str, np.ndarray] = {name: pts[:, i] for i, name in enumerate(names)}
    world = pts
    if scale is not None or translate is not None:
        s = np.ones(d) if scale is None else np.asarray(scale, float)[-d:]
        t = np.zeros(d) if translate is None else np.asarray(translate, float)[-d:]
        world = pts * s + t
        for i, name in enumerate(names):
            columns[f"{name}_world"] = world[:, i]
    for i in range(d):
        columns[f"axis-{i}"] = world[:, i]
    for key, values in (features or {}).items():
        values = np.asarray(values)
        if len(values) != n:
            raise ValueError(f"feature {key!r} has {len(values)} values for {n} points")
        if key in columns:
            raise ValueError(f"feature name {key!r} clashes with a coordinate column")
        columns[key] = values
    order = [c for c in ("row", "col", "plane") if c in columns] + [
        c for c in columns if c not in ("row", "col", "plane")
    ]
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(order)
            for i in range(n):
                w.writerow([_fmt(columns[c][i]) for c in order])
    return Path(path)


def _fmt(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    if isinstance(v, np.generic):
        return v.item()
    return v


#: napari's coordinate columns (``axis-0``, ...), written beside ours; not features.
_NAPARI_AXIS = re.compile(r"^axis-\d+$")


def read_points_csv(path: os.PathLike | str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Read a points CSV written by :func:`write_points_csv` (or with x/y columns).

    Columns ``row``/``col``/``plane`` (or ``y``/``x``/``z``, any case) give the
    pixel coordinates; world-coordinate columns (``*_world``, napari's
    ``axis-N``) are skipped; every other column
    becomes a feature (numeric where all its values parse as numbers).

    Returns
    -------
    points : ndarray of shape (N, 2) or (N, 3)
        ``(row, col)`` or ``(plane, row, col)``.
    features : dict of str to ndarray
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such points file: {path}")
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise ValueError(f"{path} is empty; expected a header with row,col columns")
    header = [h.strip() for h in rows[0]]
    body = [r for r in rows[1:] if any(cell.strip() for cell in r)]
    coord_idx: dict[str, int] = {}
    feature_idx: dict[str, int] = {}
    for i, h in enumerate(header):
        key = h.lower()
        key = _ALIASES.get(key, key)
        if key in _COORDS and key not in coord_idx:
            coord_idx[key] = i
        elif (key and not key.endswith("_world") and not _NAPARI_AXIS.match(key) and key != "index"
              and not h.startswith("Unnamed")):
            feature_idx[h] = i
    if "row" not in coord_idx or "col" not in coord_idx:
        raise ValueError(
            f"{path}: header {header} has no coordinate columns; expected 'row' and 'col' "
            "(or 'y' and 'x'), optionally 'plane'"
        )
    names = (["plane"] if "plane" in coord_idx else []) + ["row", "col"]
    try:
        pts = np.array([[float(r[coord_idx[c]]) for c in names] for r in body], dtype=float)
    except (ValueError, IndexError) as exc:
        raise ValueError(f"{path}: a coordinate value is not a number ({exc})") from exc
    pts = pts.reshape(len(body), len(names))
    feats: dict[str, np.ndarray] = {}
    for name, i in feature_idx.items():
        raw = [r[i] if i < len(r) else "" for r in body]
        try:
            feats[name] = np.array([float(v) for v in raw])
        except ValueError:
            feats[name] = np.array(raw, dtype=object)
    return pts, feats


# ----------------------------------------------------------------------------- JSON

def path_inside(root: os.PathLike | str, name: Any, *, what: str = "a file") -> Path:
    """``root / name`` for a ``name`` a manifest gives, refused when it leaves ``root``.

    Absolute names, ``..`` and symbolic links that lead out of ``root`` are
    refused: a manifest names files of its own folder only.

    Raises
    ------
    ValueError
        ``name`` is not a relative path to a place inside ``root``.

    Examples
    --------
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> path_inside(root, "images/a.tif") == root / "images" / "a.tif"
    True
    >>> path_inside(root, "../a.tif")
    Traceback (most recent call last):
    ...
    ValueError: ... names '../a.tif', outside its folder ...
    """
    root = Path(root)
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        raise ValueError(f"{root}: {what} names {name!r}, expected a relative path inside the folder")
    path = root / name
    base = root.resolve()
    try:
        path.resolve().relative_to(base)
    except ValueError:
        raise ValueError(f"{root}: {what} names {name!r}, outside its folder (through '..' or a link); "
                         "a dataset's manifest may name files of its own folder only") from None
    return path


def write_json(path: os.PathLike | str, obj: Any, *, overwrite: bool = False) -> Path:
    """Write ``obj`` as indented JSON, atomically.

    Raises
    ------
    ValueError
        If ``obj`` holds NaN or an infinite number (not valid JSON); nothing is written.
    """
    try:
        text = json.dumps(obj, indent=2, default=json_default, allow_nan=False)
    except ValueError as exc:
        raise ValueError(f"cannot write {path}: it would hold NaN or an infinite number, which JSON "
                         f"cannot store ({exc})") from None
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text + "\n")
    return Path(path)


def read_json(path: os.PathLike | str) -> Any:
    """Read a JSON file, with an error naming the file when it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {first_line(exc)}") from exc
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder; expected a JSON file") from None


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for numpy values and paths; other types raise TypeError."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot store {type(o).__name__} in JSON")
