"""Counting data: annotated images from layout datasets, folders of real images, arrays.

Three kinds of sources give ``(image, centres)`` pairs:

* a dataset folder with ``manifest.json`` written by
  :func:`cellsynth.layouts.export_dataset` (or a stylized dataset in the same format);
* a folder of real images (``.tif``, ``.tiff``, ``.png``, ``.jpg``), each annotated
  by a points CSV (``<stem>.csv`` beside it or in ``points/``; see
  :func:`cellsynth.io.read_points_csv`) or by a label image whose objects are cells
  (``<stem>_labels.tif`` beside it, or ``labels/<stem>.tif``); images without
  annotation are kept as unlabelled (``centres`` None) for domain adaptation;
* a list of ``(image, centres)`` pairs of arrays.

Images are reduced to one plane (:func:`~cellsynth.count.preprocess.split_planes`),
normalised, and optionally rescaled so that cells match a counter's training scale.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from .. import io
from .preprocess import normalize_image, rescale_plane, split_planes
from .targets import count_in_box

__all__ = ["CountItem", "centres_from_labels", "load_count_data", "read_image", "read_image_axes", "sample_crop", "split_items"]

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
SourceLike = Union[str, os.PathLike, Sequence]


@dataclass
class CountItem:
    """One normalised training or evaluation image.

    Attributes
    ----------
    image : ndarray of shape (M, N), float32
        Normalised plane (at the counter's scale when rescaled).
    centres : ndarray of shape (K, 2) or None
        Cell centres ``(row, col)``; None for unlabelled images.
    name : str
        Where it came from.
    """

    image: np.ndarray
    centres: Optional[np.ndarray]
    name: str = ""

    @property
    def count(self) -> Optional[int]:
        return None if self.centres is None else int(len(self.centres))


def centres_from_labels(labels: np.ndarray) -> np.ndarray:
    """Centroids ``(row, col)`` of the objects of a label image (one per label value > 0).

    Examples
    --------
    >>> lab = np.zeros((5, 5), int); lab[0:2, 0:2] = 1; lab[4, 4] = 3
    >>> centres_from_labels(lab).tolist()
    [[0.5, 0.5], [4.0, 4.0]]
    """
    from scipy.ndimage import center_of_mass

    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"label image must be 2D, got shape {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer) and lab.dtype != bool:
        raise TypeError(f"label image must hold integers, got dtype {lab.dtype}")
    ids = np.unique(lab)
    ids = ids[ids > 0]
    if len(ids) == 0:
        return np.zeros((0, 2))
    return np.array(center_of_mass(np.ones(lab.shape), lab, ids), dtype=float).reshape(-1, 2)


def read_image(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read a TIFF (via :func:`cellsynth.io.read_tiff`) or PNG/JPEG image as an array."""
    return read_image_axes(path)[0]


def read_image_axes(path: Union[str, os.PathLike]) -> tuple[np.ndarray, Optional[int]]:
    """Read an image and the index of its channel axis as the file declares it.

    TIFF files name their axes (ImageJ and OME TIFF: ``C`` for channels, ``S``
    for the colour samples of RGB), and so do OME-Zarr folders (read by the same
    :func:`~cellsynth.io.read_tiff`); PNG/JPEG colour images keep their samples last.
    Alpha samples (RGBA, grey + alpha) are opacity, not signal, and are left out;
    samples stored plane by plane without ImageJ/OME metadata are a stack
    (see :func:`~cellsynth.io.tiff_layout`).

    Returns
    -------
    image : ndarray
    channel_axis : int or None
        The channel axis, or None when the file has none (or does not say).
    """
    path = Path(path)
    ome_zarr = io.is_ome_zarr(path)
    if not path.is_file() and not ome_zarr:
        raise FileNotFoundError(f"no such image file: {path}")
    if path.suffix.lower() in (".tif", ".tiff") or ome_zarr:
        data, meta = io.read_tiff(path)
        axes = str(meta.get("axes") or "")
        axis = None
        if len(axes) == data.ndim:
            for name in ("C", "S"):
                if name in axes and data.shape[axes.index(name)] > 1:
                    axis = axes.index(name)
                    break
        return data, axis
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"{path}: unsupported image type {path.suffix!r}; expected one of {IMAGE_SUFFIXES}")
    data = io.read_picture(path)
    kind = path.suffix.lstrip(".").upper()
    if data.ndim == 3 and data.shape[-1] in (2, 4) and kind not in ("JPG", "JPEG"):
        data = data[..., :-1]  # grey + alpha, RGBA: the alpha plane is opacity, not signal
    if data.ndim == 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data, (data.ndim - 1 if data.ndim == 3 and data.shape[-1] == 3 else None)


def _prepare(image, centres, *, channel, factor, norm, name) -> CountItem:
    planes, lead = split_planes(np.asarray(image), channel=channel)
    if len(planes) != 1:
        raise ValueError(f"{name}: expected one 2D image, got a stack of {len(planes)} planes (shape {np.shape(image)})")
    plane = normalize_image(planes[0], **norm)
    if centres is not None:
        centres = np.asarray(centres, dtype=float).reshape(-1, np.shape(centres)[-1] if np.size(centres) else 2)
        if centres.shape[1] != 2:
            raise ValueError(f"{name}: points must be (row, col) pairs, got shape {centres.shape}")
        if not np.all(np.isfinite(centres)):
            raise ValueError(f"{name}: {int((~np.isfinite(centres)).any(axis=1).sum())} points have NaN or "
                             "infinite coordinates; expected finite (row, col) pixel coordinates")
        rows, cols = plane.shape
        outside = (centres[:, 0] < -0.5) | (centres[:, 1] < -0.5) | (centres[:, 0] > rows) | (centres[:, 1] > cols)
        if outside.any():
            r, c = centres[np.argmax(outside)]
            raise ValueError(f"{name}: {int(outside.sum())} points lie outside the {rows}x{cols} image "
                             f"(e.g. row {r:g}, col {c:g}); expected pixel coordinates (row, col) inside it")
    if factor != 1.0:
        plane = rescale_plane(plane, factor)
        if centres is not None:
            centres = (centres + 0.5) * factor - 0.5
    return CountItem(plane, centres, name)


def _folder_items(root: Path, with_unlabelled: bool) -> list[tuple[Path, Optional[Path], str]]:
    found = []
    for img in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        stem = img.stem
        if stem.endswith(("_labels", "_label", "_mask")):
            continue
        ann = None
        for cand, kind in (
            (img.with_suffix(".csv"), "points"),
            (root / "points" / f"{stem}.csv", "points"),
            (root / f"{stem}_labels.tif", "labels"),
            (root / f"{stem}_labels.tiff", "labels"),
            (root / f"{stem}_labels.png", "labels"),
            (root / "labels" / f"{stem}.tif", "labels"),
            (root / "labels" / f"{stem}.png", "labels"),
        ):
            if cand.is_file():
                ann = (cand, kind)
                break
        if ann is None and not with_unlabelled:
            continue
        found.append((img, ann[0] if ann else None, ann[1] if ann else ""))
    return found


def load_count_data(
    source: SourceLike,
    *,
    channel: Optional[int] = None,
    factor: float = 1.0,
    normalize: Optional[dict] = None,
    unlabelled: bool = False,
) -> list[CountItem]:
    """Load annotated (or, with ``unlabelled=True``, also unannotated) images.

    Parameters
    ----------
    source : path or sequence
        A layout/stylized dataset folder (``manifest.json``), a folder of images
        with points CSVs or label images, a single image file with a ``.csv`` of
        the same stem, or a sequence of ``(image, centres)`` pairs (``centres``
        may be None for unlabelled images).
    channel : int, optional
        Channel of multichannel images (default: max over channels).
    factor : float
        Rescale images and centres by this factor (counter diameter / data diameter).
    normalize : dict, optional
        ``low``/``high`` percentiles for :func:`normalize_image`.
    unlabelled : bool
        Keep images without annotation (``centres`` None).

    Returns
    -------
    list of CountItem

    Raises
    ------
    FileNotFoundError
        The path does not exist.
    ValueError
        A folder without any usable image, or malformed annotations.

    Examples
    --------
    >>> items = load_count_data([(np.eye(32, dtype=np.uint8) * 255, [[3.0, 3.0]])])
    >>> items[0].image.shape, items[0].count
    ((32, 32), 1)
    """
    norm = dict(normalize or {})
    if not factor > 0:
        raise ValueError(f"factor must be positive, got {factor!r}")
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if not p.exists():
            raise FileNotFoundError(f"no such dataset or image folder: {p}")
        if (p / "manifest.json").is_file() or p.name == "manifest.json":
            from ..layouts import read_dataset

            ds = read_dataset(p)
            out = []
            for i in range(len(ds)):
                image, centres, _ = ds.load(i)
                out.append(_prepare(image, centres, channel=channel, factor=factor, norm=norm,
                                    name=str(ds.root / ds.items[i]["image"])))
            return out
        if p.is_file():
            pairs = [(p, p.with_suffix(".csv"), "points")]
            if not pairs[0][1].is_file():
                raise FileNotFoundError(f"{p}: no points file {pairs[0][1].name} beside the image")
        else:
            pairs = _folder_items(p, unlabelled)
            if not pairs:
                raise ValueError(
                    f"{p} holds no annotated images: expected manifest.json, or images with a points CSV "
                    "(<stem>.csv or points/<stem>.csv) or a label image (<stem>_labels.tif or labels/<stem>.tif)"
                )
        out = []
        for img_path, ann, kind in pairs:
            image = read_image(img_path)
            if ann is None:
                centres = None
            elif kind == "points":
                pts, _ = io.read_points_csv(ann)
                centres = pts[:, -2:]
            else:
                lab = np.squeeze(read_image(ann))
                if not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool):
                    raise TypeError(f"{ann}: a label image must hold integer labels, got dtype {lab.dtype}")
                centres = centres_from_labels(lab.astype(np.int64))
            out.append(_prepare(image, centres, channel=channel, factor=factor, norm=norm, name=str(img_path)))
        return out
    if isinstance(source, Iterable):
        out = []
        for k, pair in enumerate(source):
            if isinstance(pair, CountItem):
                out.append(pair)
                continue
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise ValueError(f"item {k}: expected an (image, centres) pair, got {type(pair).__name__}")
            if pair[1] is None and not unlabelled:
                raise ValueError(f"item {k} has no centres; pass unlabelled=True to keep unlabelled images")
            out.append(_prepare(pair[0], pair[1], channel=channel, factor=factor, norm=norm, name=f"item {k}"))
        if not out:
            raise ValueError("no images given")
        return out
    raise TypeError(f"source must be a path or a sequence of (image, centres), got {type(source).__name__}")


def split_items(items: list, fraction: float, *, rng=None) -> tuple[list, list]:
    """Random split into ``(train, validation)`` with ``round(fraction * n)`` validation items (at least 1 when n > 1).

    Examples
    --------
    >>> a, b = split_items(list(range(10)), 0.2, rng=0)
    >>> len(a), len(b), sorted(a + b) == list(range(10))
    (8, 2, True)
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction!r}")
    n = len(items)
    k = int(round(fraction * n))
    if fraction > 0 and n > 1:
        k = max(1, min(k, n - 1))
    order = np.random.default_rng(rng).permutation(n)
    return [items[i] for i in order[k:]], [items[i] for i in order[:k]]


def sample_crop(item: CountItem, size: int, rng: np.random.Generator, *, augment: bool = True):
    """A random ``size x size`` crop of an item and the centres inside it (zero-padded when smaller).

    Returns ``(crop, centres)``; ``centres`` is None for unlabelled items. With
    ``augment``, a random rot90 and flip are applied to both.
    """
    img = item.image
    rows, cols = img.shape
    if rows < size or cols < size:
        img = np.pad(img, ((0, max(0, size - rows)), (0, max(0, size - cols))), mode="constant")
        rows, cols = img.shape
    r0 = int(rng.integers(0, rows - size + 1))
    c0 = int(rng.integers(0, cols - size + 1))
    crop = img[r0:r0 + size, c0:c0 + size]
    cen = None
    if item.centres is not None:
        c = item.centres
        cen = c[count_in_box(c, (r0, c0, r0 + size, c0 + size))] - (r0, c0) if len(c) else np.zeros((0, 2))
    if augment:
        k = int(rng.integers(0, 4))
        flip = rng.random() < 0.5
        crop, cen = _rot_flip(crop, cen, k, flip)
    return np.ascontiguousarray(crop), cen


def _rot_flip(img: np.ndarray, cen: Optional[np.ndarray], k: int, flip: bool):
    """Rotate by k*90 degrees (numpy's rot90) and flip columns; centres follow pixel indices exactly."""
    n = img.shape[0]
    img = np.rot90(img, k)
    if cen is not None and len(cen):
        r, c = cen[:, 0], cen[:, 1]
        for _ in range(k % 4):  # rot90 maps pixel (r, c) to (n - 1 - c, r)
            r, c = n - 1 - c, r
        cen = np.stack([r, c], axis=1)
    if flip:
        img = img[:, ::-1]
        if cen is not None and len(cen):
            cen = np.stack([cen[:, 0], n - 1 - cen[:, 1]], axis=1)
    if cen is not None and len(cen):
        # Centres count by the pixel floor(row), floor(col): keep every one inside.
        cen = np.clip(cen, 0.0, np.nextafter(n, 0))
    return img, cen
