"""Counts in regions of interest: a tissue area, a well quadrant, a wound, drawn by hand.

Regions come from napari's shapes CSV (``File > Save Selected Layers`` of a
Shapes layer: rectangles, ellipses, polygons) or from GeoJSON (what QuPath
exports: ``Polygon`` and ``MultiPolygon`` features, ``x``/``y`` in pixels). Each
region is rasterised on the image's pixel grid (:func:`skimage.draw.polygon`,
:func:`skimage.draw.ellipse`): a pixel belongs to a region when its centre lies
inside it or on its edge.

**Border rule.** A cell belongs to a region when the pixel holding its centre
(the centre rounded to whole pixels) belongs to the region: a cell whose centre
lies outside is not counted however much of it overlaps, and a cell on an edge
that two regions share, or in two overlapping regions, counts in both.

Examples
--------
>>> import numpy as np
>>> r = Region("left", "rectangle", np.array([[0, 0], [0, 5], [10, 5], [10, 0]], float))
>>> rows = count_in_regions(np.array([[2.0, 2.0], [2.0, 8.0]]), [r], (10, 10))
>>> rows[0]["region"], rows[0]["count"], rows[0]["area_px"]  # rows 0-9, columns 0-5 (edges included)
('left', 1, 60)
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = ["Region", "read_regions", "region_mask", "region_masks", "count_in_regions", "point_regions",
           "REGION_KINDS"]

#: Shapes a region can have.
REGION_KINDS = ("rectangle", "ellipse", "polygon")


@dataclass(frozen=True)
class Region:
    """A region of interest: a name, a kind and its vertices ``(K, 2)`` as (row, col) pixels.

    For an ellipse the vertices are the four corners of its bounding box, as napari stores them.
    """

    name: str
    kind: str
    vertices: np.ndarray

    def __post_init__(self) -> None:
        v = np.asarray(self.vertices, float)
        if self.kind not in REGION_KINDS:
            raise ValueError(f"region {self.name!r}: kind must be one of {REGION_KINDS}, got {self.kind!r}")
        if v.ndim != 2 or v.shape[1] != 2 or len(v) < 3 or not np.all(np.isfinite(v)):
            raise ValueError(f"region {self.name!r}: expected at least 3 finite (row, col) vertices, got shape "
                             f"{v.shape}")
        object.__setattr__(self, "vertices", v)


def region_mask(region: Region, shape: tuple) -> np.ndarray:
    """The pixels of ``region`` on an image of ``shape`` (rows, cols): a pixel whose centre lies inside it."""
    from skimage.draw import ellipse, polygon

    mask = np.zeros(tuple(int(s) for s in shape[-2:]), bool)
    v = region.vertices
    if region.kind == "ellipse":
        lo, hi = v.min(axis=0), v.max(axis=0)
        centre, radius = (lo + hi) / 2.0, (hi - lo) / 2.0
        if np.all(radius > 0):
            rr, cc = ellipse(centre[0], centre[1], radius[0], radius[1], shape=mask.shape)
            mask[rr, cc] = True
        return mask
    rr, cc = polygon(v[:, 0], v[:, 1], shape=mask.shape)
    mask[rr, cc] = True
    return mask


def region_masks(regions: list[Region], shape: tuple) -> list[np.ndarray]:
    """The pixels of each region on an image of ``shape``.

    Raises
    ------
    ValueError
        A region that holds no pixel of the image (it lies outside it).
    """
    rows, cols = int(shape[-2]), int(shape[-1])
    masks = [region_mask(r, (rows, cols)) for r in regions]
    for region, mask in zip(regions, masks):
        if not mask.any():
            raise ValueError(f"region {region.name!r} holds no pixel of the {rows}x{cols} image (it lies outside "
                             "it, or is thinner than a pixel)")
    return masks


def _centre_pixels(points: np.ndarray, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """``(pixel of each centre, whether it lies on the image)`` by the border rule (rounded centres)."""
    p = np.asarray(points, float)
    p = p.reshape(-1, p.shape[-1] if p.ndim == 2 else 2)[:, -2:]
    idx = np.rint(p).astype(int)
    inside = (idx[:, 0] >= 0) & (idx[:, 0] < int(shape[-2])) & (idx[:, 1] >= 0) & (idx[:, 1] < int(shape[-1]))
    return np.where(inside[:, None], idx, 0), inside


def count_in_regions(points: np.ndarray, regions: list[Region], shape: tuple, *,
                     pixel_size: Optional[float] = None, masks: Optional[list] = None) -> list[dict]:
    """One row per region: ``region``, ``count``, ``area_px`` and a density.

    Parameters
    ----------
    points : ndarray of shape (K, 2) or (K, 2 + S)
        Cell centres (row, col) in pixels; stack coordinates before them are ignored.
    regions : list of Region
    shape : tuple
        The image's (rows, cols).
    pixel_size : float, optional
        Micrometres per pixel: adds ``area_um2`` and ``per_mm2``; without it the
        density is ``per_megapixel``.
    masks : list of ndarray, optional
        The regions' :func:`region_masks`, when already made.

    Raises
    ------
    ValueError
        A region that holds no pixel of the image (it lies outside it).
    """
    masks = region_masks(regions, shape) if masks is None else masks
    idx, inside = _centre_pixels(points, shape)
    out = []
    for region, mask in zip(regions, masks):
        area = int(mask.sum())
        n = int((mask[idx[:, 0], idx[:, 1]] & inside).sum())
        row = {"region": region.name, "kind": region.kind, "count": n, "area_px": area}
        if pixel_size:
            um2 = area * float(pixel_size) ** 2
            row.update(area_um2=round(um2, 3), per_mm2=round(n / (um2 * 1e-6), 3))
        else:
            row["per_megapixel"] = round(n / (area * 1e-6), 3)
        out.append(row)
    return out


def point_regions(points: np.ndarray, regions: list[Region], shape: tuple, *,
                  masks: Optional[list] = None) -> list[str]:
    """For each point, the names of the regions holding it (the border rule above), joined by ``;`` ("" for none)."""
    masks = region_masks(regions, shape) if masks is None else masks
    idx, inside = _centre_pixels(points, shape)
    names: list[list[str]] = [[] for _ in range(len(idx))]
    for region, mask in zip(regions, masks):
        for k in np.flatnonzero(mask[idx[:, 0], idx[:, 1]] & inside):
            names[k].append(region.name)
    return [";".join(n) for n in names]


def read_regions(path: os.PathLike | str) -> list[Region]:
    """Regions from napari's shapes CSV (``.csv``) or GeoJSON (``.geojson``/``.json``).

    Raises
    ------
    FileNotFoundError, ValueError
        A missing file, another format, or shapes that are not areas (lines, paths, points).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such regions file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_shapes_csv(path)
    if suffix in (".geojson", ".json"):
        return _read_geojson(path)
    raise ValueError(f"{path}: regions must be napari's shapes CSV (.csv) or GeoJSON (.geojson, .json), got "
                     f"{suffix or 'no suffix'!r}")


def _read_shapes_csv(path: Path) -> list[Region]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    need = {"index", "shape-type", "vertex-index"}
    if not rows or not need <= set(rows[0]):
        raise ValueError(f"{path} is not napari's shapes CSV: expected the columns index, shape-type, "
                         "vertex-index, axis-0, axis-1")
    axes = sorted((k for k in rows[0] if k.startswith("axis-")), key=lambda k: int(k.split("-")[1]))
    if len(axes) < 2:
        raise ValueError(f"{path}: expected at least the columns axis-0 and axis-1")
    shapes: dict[int, dict] = {}
    try:
        for r in rows:
            s = shapes.setdefault(int(r["index"]), {"kind": r["shape-type"].strip().lower(), "v": []})
            s["v"].append((int(r["vertex-index"]), float(r[axes[-2]]), float(r[axes[-1]])))
    except ValueError as exc:
        raise ValueError(f"{path}: a row is not numbers where numbers are expected ({exc})") from None
    out = []
    for i, s in sorted(shapes.items()):
        if s["kind"] not in REGION_KINDS:
            raise ValueError(f"{path}: shape {i} is a {s['kind']!r}, not an area; regions are rectangles, ellipses "
                             "or polygons")
        v = np.array([(r, c) for _, r, c in sorted(s["v"])], float)
        out.append(Region(f"region {i + 1}", s["kind"], v))
    return out


def _read_geojson(path: Path) -> list[Region]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc})") from None
    features = doc.get("features") if isinstance(doc, dict) and doc.get("type") == "FeatureCollection" else (
        [doc] if isinstance(doc, dict) and doc.get("type") == "Feature" else
        doc if isinstance(doc, list) else None)
    if features is None:
        raise ValueError(f"{path} is not GeoJSON: expected a FeatureCollection, a Feature or a list of features")
    out = []
    for k, f in enumerate(features):
        geom = (f or {}).get("geometry") or {}
        props = (f or {}).get("properties") or {}
        name = str(props.get("name") or (props.get("classification") or {}).get("name") or f"region {k + 1}")
        kind = geom.get("type")
        polys = [geom.get("coordinates")] if kind == "Polygon" else (
            geom.get("coordinates") if kind == "MultiPolygon" else None)
        if polys is None:
            raise ValueError(f"{path}: feature {k + 1} is a {kind!r}, not an area; regions are Polygon or "
                             "MultiPolygon features")
        for j, poly in enumerate(polys):
            try:
                ring = np.asarray(poly[0], float)[:, :2]  # the outer ring; holes are not subtracted
            except (TypeError, ValueError, IndexError):
                raise ValueError(f"{path}: feature {k + 1} has no readable outer ring of [x, y] pairs") from None
            label = name if len(polys) == 1 else f"{name} {j + 1}"
            out.append(Region(label, "polygon", ring[:, ::-1]))  # GeoJSON x, y -> row, col
    if not out:
        raise ValueError(f"{path} holds no regions")
    return out
