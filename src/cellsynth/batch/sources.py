"""Finding images (files, folders, globs) and opening them lazily, plane by plane.

TIFF and OME-TIFF open through tifffile's zarr store (only the strips or tiles
read are decoded), OME-Zarr through zarr (the full-resolution level of its
multiscales), PNG and JPEG are decoded whole (they are small by nature). Each
image is a :class:`LazyImage`: its shape and axes from the file's header, a
dask array made on first use, the axis that holds channels (as the file
declares it, like ``cellsynth count`` reads it), and the stack axes whose
planes are counted one by one.
"""

from __future__ import annotations

import glob
import itertools
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from .. import io

__all__ = ["IMAGE_SUFFIXES", "LazyImage", "find_images", "open_image", "read_small_plane"]

#: File suffixes counted (plus OME-Zarr folders: ``*.zarr`` holding zarr metadata).
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


def _is_zarr(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in (".zattrs", ".zgroup", ".zarray", "zarr.json"))


def _is_image(path: Path) -> bool:
    return (path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES) or _is_zarr(path)


def _walk(folder: Path, skip: Optional[Path]) -> Iterable[Path]:
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        keep = []
        for d in sorted(dirs):
            p = here / d
            if d.startswith(".") or (skip is not None and p.resolve() == skip):
                continue
            if _is_zarr(p):
                yield p
            else:
                keep.append(d)
        dirs[:] = keep
        for f in sorted(files):
            p = here / f
            if not f.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES:
                yield p


def find_images(inputs: Iterable[Any], *, skip: Optional[os.PathLike] = None) -> list[Path]:
    """The images named by files, folders (searched recursively) and glob patterns, in order, once each.

    Parameters
    ----------
    inputs : iterable of str or path-like
    skip : path-like, optional
        A folder never searched (the results folder, when it lies inside an input).

    Raises
    ------
    FileNotFoundError
        An input that is neither an existing path nor a pattern matching something.
    ValueError
        A file of an unsupported type, or no image at all.

    Examples
    --------
    >>> import tempfile, numpy as np, tifffile
    >>> d = Path(tempfile.mkdtemp())
    >>> for n in ("b.tif", "a.tif", "notes.txt"):
    ...     _ = (d / n).write_bytes(b"") if n.endswith("txt") else tifffile.imwrite(d / n, np.zeros((4, 4), np.uint8))
    >>> [p.name for p in find_images([d])]
    ['a.tif', 'b.tif']
    """
    skip_r = Path(skip).resolve() if skip is not None else None
    found: list[Path] = []
    for item in inputs:
        text = str(item)
        p = Path(text)
        if p.exists():
            if _is_zarr(p):
                found.append(p)
            elif p.is_dir():
                found.extend(_walk(p, skip_r))
            elif p.suffix.lower() in IMAGE_SUFFIXES:
                found.append(p)
            else:
                raise ValueError(f"{p}: unsupported image type {p.suffix!r}; expected TIFF/OME-TIFF, OME-Zarr, "
                                 f"PNG or JPEG ({', '.join(IMAGE_SUFFIXES)}, .zarr)")
        elif glob.has_magic(text):
            matches = [Path(m) for m in sorted(glob.glob(text, recursive=True))]
            matches = [m for m in matches if _is_image(m)]
            if not matches:
                raise FileNotFoundError(f"no image matches the pattern {text!r}")
            found.extend(matches)
        else:
            raise FileNotFoundError(f"no such file, folder or pattern: {text}")
    seen, out = set(), []
    for p in found:
        key = p.resolve()
        if key not in seen and (skip_r is None or skip_r not in key.parents):
            seen.add(key)
            out.append(p)
    if not out:
        raise ValueError(f"no images found in {', '.join(map(str, inputs))}; expected TIFF/OME-TIFF, OME-Zarr, "
                         "PNG or JPEG files")
    return out


class LazyImage:
    """An image opened without reading its pixels.

    Opening reads only the file's header (shape, axes); the dask array over the
    pixels is made on first use of :attr:`data` (or :meth:`plane`), so planning
    a batch of many files needs neither dask.array nor zarr.

    Attributes
    ----------
    path : Path
    shape : tuple of int
        Shape of all of it, as stored.
    axes : str
        One letter per axis (``T``, ``Z``, ``C``, ``Y``, ``X``, ``S`` ...), ``""`` when unknown.
    channel_axis : int or None
        The axis holding channels, as the file declares it (None: none declared).
    """

    def __init__(self, path: Path, data: Any, axes: str, channel_axis: Optional[int]) -> None:
        self.path, self.axes, self.channel_axis = Path(path), axes, channel_axis
        self._make, self._data, self.shape = None, data, tuple(int(s) for s in data.shape)

    def __repr__(self) -> str:
        return (f"LazyImage({str(self.path)!r}, shape={self.shape}, axes={self.axes!r}, "
                f"channel_axis={self.channel_axis})")

    @classmethod
    def deferred(cls, path: Path, shape, make, axes: str, channel_axis: Optional[int]) -> "LazyImage":
        """An image whose dask array ``make()`` builds when first needed."""
        img = cls.__new__(cls)
        img.path, img.axes, img.channel_axis = Path(path), axes, channel_axis
        img._make, img._data, img.shape = make, None, tuple(int(s) for s in shape)
        return img

    @property
    def data(self):
        """All of it, as stored: a dask array (made on first use)."""
        if self._data is None:
            data = self._make()
            if tuple(data.shape) != self.shape:
                raise ValueError(f"{self.path}: the file's header gives shape {self.shape} but it reads as "
                                 f"{data.shape}")
            self._data = data
        return self._data

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """Shape of the axes whose planes are counted one by one (``()`` for one plane)."""
        shape = [s for i, s in enumerate(self.shape) if i != self.channel_axis]
        if self.channel_axis is None and self.ndim >= 3 and self.shape[-1] <= 4 \
                and min(self.shape[-3:-1]) > 4:
            shape = shape[:-1]  # colour samples last (PNG, JPEG, RGB TIFF without axes)
        return tuple(shape[:-2])

    @property
    def stack_axes(self) -> str:
        """Letters of the stack axes (``"T"``, ``"ZT"``...), ``"P"`` per axis when the file does not say."""
        if len(self.axes) == self.ndim:
            letters = [a for i, a in enumerate(self.axes) if i != self.channel_axis]
            return "".join(letters[: len(self.stack_shape)])
        return "P" * len(self.stack_shape)

    @property
    def n_planes(self) -> int:
        return int(np.prod(self.stack_shape)) if self.stack_shape else 1

    def plane_indices(self) -> list[tuple[int, ...]]:
        """Every plane's index in the stack axes, in order (``[()]`` for one plane)."""
        return list(itertools.product(*(range(s) for s in self.stack_shape)))

    def plane(self, index: tuple[int, ...] = ()):
        """``(array, channel_axis)``: the dask array of one plane (with its channels) for the counter."""
        data, ch = self.data, self.channel_axis
        if ch is not None:
            import dask.array as da

            data, ch = da.moveaxis(data, ch, -1), data.ndim - 1
        if len(index) != len(self.stack_shape):
            raise ValueError(f"plane index {index} does not fit the stack shape {self.stack_shape}")
        out = data[tuple(index)] if index else data
        return out, (out.ndim - 1 if ch is not None else None)

    def fingerprint(self) -> dict:
        """What identifies this version of the file: size and modification time (of the metadata for zarr)."""
        p = self.path
        if p.is_dir():
            files = [f for f in (p / "zarr.json", p / ".zattrs", p / ".zgroup") if f.is_file()]
            st = [f.stat() for f in files]
            return {"shape": list(self.shape), "mtime_ns": max(s.st_mtime_ns for s in st) if st else 0}
        st = p.stat()
        return {"shape": list(self.shape), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _tiff(path: Path) -> LazyImage:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, keep = io.tiff_layout(tif)
            shape = tuple(series.shape)
            offset = series.dataoffset  # None unless the pixels lie in one uncompressed run
            dtype = np.dtype(series.dtype).newbyteorder(tif.byteorder)
    except (tifffile.TiffFileError, ValueError, IndexError) as exc:
        raise ValueError(f"{path} is not a readable TIFF file: {exc}") from exc
    if offset is not None and (len(shape) == 2 or (len(shape) == 3 and axes.endswith("S"))):
        # An uncompressed image is one zarr chunk: read it in bands of rows instead.
        whole = lambda: _bands(path, offset, shape, dtype)  # noqa: E731
    else:
        whole = lambda: _tiff_zarr(path)  # noqa: E731
    if keep is None:
        return LazyImage.deferred(path, shape, whole, axes, _declared_channel_axis(axes, shape))
    s = axes.index("S")  # alpha samples are opacity, not signal
    kept = shape[:s] + (keep,) + shape[s + 1:]
    return LazyImage.deferred(path, kept, lambda: whole()[(slice(None),) * s + (slice(0, keep),)], axes,
                              _declared_channel_axis(axes, kept))


def _tiff_zarr(path: Path):
    """A dask array over a TIFF's first series (full resolution) through tifffile's zarr store."""
    import dask.array as da
    import tifffile
    import zarr

    store = tifffile.imread(path, aszarr=True, series=0, level=0)
    z = zarr.open(store, mode="r")
    if isinstance(z, zarr.Group):  # a pyramid: level 0 is full resolution
        z = z["0"]
    return da.from_zarr(z)


def _read_rows(path: str, offset: int, r0: int, r1: int, shape, dtype) -> np.ndarray:
    row = int(np.prod(shape[1:]))
    with open(path, "rb") as fh:
        out = np.fromfile(fh, dtype=dtype, count=(r1 - r0) * row, offset=offset + r0 * row * dtype.itemsize)
    return out.reshape((r1 - r0,) + tuple(shape[1:])).astype(dtype.newbyteorder("="), copy=False)


def _bands(path: Path, offset: int, shape, dtype, band_bytes: int = 32 << 20):
    """A dask array over an uncompressed TIFF image, read in bands of rows (about ``band_bytes`` each)."""
    import dask
    import dask.array as da

    rows = max(1, band_bytes // max(1, int(np.prod(shape[1:])) * dtype.itemsize))
    blocks = [da.from_delayed(dask.delayed(_read_rows)(str(path), offset, r0, min(shape[0], r0 + rows), shape, dtype),
                              shape=(min(shape[0], r0 + rows) - r0,) + tuple(shape[1:]), dtype=dtype.newbyteorder("="))
              for r0 in range(0, shape[0], rows)]
    return da.concatenate(blocks, axis=0)


def _declared_channel_axis(axes: str, shape) -> Optional[int]:
    """The channel axis as ``count.data.read_image_axes`` takes it from a TIFF's axes."""
    if len(axes) == len(shape):
        for name in ("C", "S"):
            if name in axes and shape[axes.index(name)] > 1:
                return axes.index(name)
    return None


def _ome_zarr(path: Path) -> LazyImage:
    import zarr

    def lazy(z):
        import dask.array as da

        return lambda: da.from_zarr(z)

    try:
        root = zarr.open(str(path), mode="r")
    except Exception as exc:  # whatever a broken store raises
        raise ValueError(f"{path} is not a readable zarr store: {exc}") from exc
    if isinstance(root, zarr.Array):
        return LazyImage.deferred(path, root.shape, lazy(root), "", None)
    attrs = dict(root.attrs)
    ms = (attrs.get("ome") or {}).get("multiscales") or attrs.get("multiscales")
    if not ms:
        raise ValueError(f"{path} is a zarr group without OME-Zarr 'multiscales' metadata; expected an OME-Zarr image")
    level = ms[0]["datasets"][0]["path"]
    arr = root[level]
    names = [a["name"] if isinstance(a, dict) else str(a) for a in ms[0].get("axes", [])]
    axes = "".join(n[:1].upper() for n in names) if len(names) == arr.ndim else ""
    return LazyImage.deferred(path, arr.shape, lazy(arr), axes, _declared_channel_axis(axes, arr.shape))


def _flat(path: Path) -> LazyImage:
    from ..count.data import read_image_axes

    data, axis = read_image_axes(path)

    def make():
        import dask.array as da

        return da.from_array(data, chunks=data.shape)

    return LazyImage.deferred(path, data.shape, make, "", axis)


def open_image(path: os.PathLike | str) -> LazyImage:
    """Open an image lazily (see the module's description).

    Raises
    ------
    FileNotFoundError, ValueError
        A missing path, an unsupported or unreadable file.

    Examples
    --------
    >>> import tempfile, tifffile
    >>> p = Path(tempfile.mkdtemp()) / "t.tif"
    >>> tifffile.imwrite(p, np.zeros((3, 20, 30), np.uint16), imagej=True, metadata={"axes": "TYX"})
    >>> im = open_image(p)
    >>> im.stack_shape, im.stack_axes, im.plane((1,))[0].shape
    ((3,), 'T', (20, 30))
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such image: {p}")
    if _is_zarr(p):
        return _ome_zarr(p)
    if p.suffix.lower() in (".tif", ".tiff"):
        return _tiff(p)
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return _flat(p)
    raise ValueError(f"{p}: unsupported image type {p.suffix!r}; expected one of {IMAGE_SUFFIXES} or an OME-Zarr folder")


def read_small_plane(path: os.PathLike | str, max_pixels: int) -> Optional[tuple[np.ndarray, Optional[int]]]:
    """``(pixels, channel_axis)`` of a one-plane TIFF of at most ``max_pixels`` pixels, read whole; else None.

    The same values, dtype and channel axis as ``open_image(path).plane(())``
    gives, read with tifffile alone: a batch worker counting small images then
    needs neither dask.array nor zarr (about 1.4 s of imports per worker, as
    dask.array brings xarray and pandas along). None for anything else (stacks,
    other formats, unreadable files), which the caller opens with
    :func:`open_image`.
    """
    p = Path(path)
    if p.suffix.lower() not in (".tif", ".tiff") or not p.is_file():
        return None
    import tifffile

    try:
        with tifffile.TiffFile(p) as tif:
            series = tif.series[0]
            (axes, keep), shape = io.tiff_layout(tif), tuple(series.shape)
            ch = _declared_channel_axis(axes, shape)
            if keep is not None or not (len(shape) == 2 or (len(shape) == 3 and ch is not None)):
                return None
            spatial = [s for i, s in enumerate(shape) if i != ch]
            if spatial[0] * spatial[1] > max_pixels or int(np.prod(shape)) > 4 * max_pixels:
                return None  # large planes, or more than 4 channels' worth: read as open_image does
            data = series.asarray(level=0)
    except (tifffile.TiffFileError, ValueError, IndexError, OSError):
        return None
    if tuple(data.shape) != shape:
        return None
    data = data.astype(data.dtype.newbyteorder("="), copy=False)
    if ch is None:
        return data, None
    return np.moveaxis(data, ch, -1), 2
