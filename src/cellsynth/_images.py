"""Image files: TIFF / OME-TIFF / ImageJ TIFF, OME-Zarr folders, PNG and JPEG.

Reading checks the memory a file's header declares before decoding it; writing
is atomic (:mod:`cellsynth._atomic`). :mod:`cellsynth.io` re-exports the public
names.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ._atomic import atomic_path
from ._memory import NotEnoughMemory, first_line, require_memory

__all__ = ["read_tiff", "read_tiff_header", "read_picture", "tiff_layout", "write_tiff", "is_ome_zarr"]


def read_tiff(path: os.PathLike | str) -> tuple[np.ndarray, dict]:
    """Read a TIFF / OME-TIFF / ImageJ TIFF, or an OME-Zarr folder (its full-resolution level).

    Returns
    -------
    data : ndarray
        The image as stored (all pages stacked).
    meta : dict
        ``pixel_size`` (float, micrometres per pixel, or None when the file does
        not say), ``unit`` (str or None), ``axes`` (tifffile's axes string, or the
        OME-Zarr axis names as letters, e.g. ``"CYX"``) and ``channel_names``
        (list of str from OME metadata, or None).

    Raises
    ------
    FileNotFoundError, ValueError
        Missing file, a file that is not a readable TIFF, or one whose header
        declares more data than the memory free now (checked before reading).
    """
    import tifffile

    path = Path(path)
    if is_ome_zarr(path):
        return _read_ome_zarr(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such image file: {path}")
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            nbytes = int(np.prod(series.shape)) * np.dtype(series.dtype).itemsize
            require_memory(nbytes, what=f"reading {path} ({tuple(series.shape)} {np.dtype(series.dtype)})",
                           hint="crop or downsample the image first, or read it in tiles")
            axes, keep = tiff_layout(tif)
            data = tif.asarray()
            if keep is not None:  # alpha samples are opacity, not signal
                data = np.take(data, range(keep), axis=axes.index("S"))
            meta = {"axes": axes, "pixel_size": None, "unit": None, "channel_names": None}
            meta.update(_header(tif))
    except NotEnoughMemory:
        raise
    except MemoryError:
        raise NotEnoughMemory(f"reading {path} needs more memory than is free; crop or downsample the image "
                              "first") from None
    except Exception as exc:  # truncated or corrupt files raise whatever the decoder meets (struct.error, ...)
        raise ValueError(f"{path} is not a readable TIFF file: {first_line(exc)}") from exc
    return data, meta


def _tiff_pixel_size(tif) -> tuple:
    """``(micrometres per pixel or None, unit or None)`` from an open TIFF's OME, ImageJ or resolution tags."""
    if tif.ome_metadata:
        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
        if m:
            u = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
            return float(m.group(1)), (u.group(1) if u else "µm")
    page = tif.pages[0]
    tag = page.tags.get("XResolution")
    ij = tif.imagej_metadata or {}
    if tag is not None:
        num, den = tag.value
        unit = ij.get("unit")
        if num and den and (unit or page.tags.get("ResolutionUnit")):
            size = den / num
            res_unit = page.tags.get("ResolutionUnit")
            code = int(res_unit.value) if res_unit is not None else 1
            if unit in ("micron", "um", "µm", "\\u00B5m"):
                return size, "µm"
            if code == 3:  # centimetre
                return size * 1e4, "µm"
            if code == 2:  # inch
                return size * 25400.0, "µm"
    return None, None


def _header(tif) -> dict:
    """``pixel_size``, ``unit`` and ``channel_names`` (OME) that an open TIFF's header declares."""
    names = re.findall(r'<Channel\b[^>]*?\bName="([^"]*)"', tif.ome_metadata) if tif.ome_metadata else []
    size, unit = _tiff_pixel_size(tif)
    return {"pixel_size": size, "unit": unit, "channel_names": names or None}


def read_tiff_header(path: os.PathLike | str) -> dict:
    """What a TIFF's header says (see :func:`read_tiff`'s ``meta``: pixel size, unit, channel names), without
    reading its pixels; for other files, and unreadable headers, every value is None."""
    import tifffile

    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff") and path.is_file():
        try:
            with tifffile.TiffFile(path) as tif:
                return _header(tif)
        except Exception:  # an unreadable header: nothing declared (reading the pixels says what is wrong)
            pass
    return {"pixel_size": None, "unit": None, "channel_names": None}


def read_picture(path: os.PathLike | str) -> np.ndarray:
    """Read a PNG or JPEG file (samples last, as decoded), refusing what cannot be read in one line.

    Raises
    ------
    FileNotFoundError, ValueError
        A missing, empty, truncated or corrupt file; one whose header declares
        more pixels than the memory free now (:class:`NotEnoughMemory`, checked
        before decoding) or than the decoder's guard against decompression bombs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such image file: {path}")
    kind = path.suffix.lstrip(".").upper() or "image"
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes); expected a {kind} image")
    try:
        from PIL import Image

        with Image.open(path) as im:
            cols, rows = im.size
            bands = len(im.getbands())
    except Exception:  # unreadable header: the decoder names the problem below
        pass
    else:
        require_memory(8.0 * rows * cols * bands, what=f"reading {path} ({rows}x{cols}, {bands} band(s))",
                       hint="crop or downsample the image first")
    from skimage.io import imread

    try:
        return np.asarray(imread(str(path)))
    except NotEnoughMemory:
        raise
    except Exception as exc:  # truncated or corrupt files, decompression bombs: whatever the decoder raises
        raise ValueError(f"{path} is not a readable {kind} image: {first_line(exc)}") from exc


def tiff_layout(tif) -> tuple[str, Optional[int]]:
    """How the first series of an open ``tifffile.TiffFile`` is read: its axes, and the samples to keep.

    Returns
    -------
    axes : str
        tifffile's axes of the series, except that samples stored plane by plane
        in front of the rows (``"SYX"``: what ``tifffile.imwrite`` makes of an
        array of 3 or 4 planes when no axes are given) in a file without ImageJ
        or OME metadata are a stack of planes, ``"Q"``, not the colours of one
        image.
    keep : int or None
        For colour samples followed by alpha samples (RGBA, grey + alpha), the
        number of samples before the alpha; None when every sample is kept.
    """
    series = tif.series[0]
    axes = str(series.axes)
    page = tif.pages[0]
    if "S" not in axes:
        return axes, None
    s = axes.index("S")
    planar = "Y" in axes and s < axes.index("Y")
    if planar and not (tif.is_imagej or tif.is_ome):
        return axes.replace("S", "Q"), None
    extra = [int(e) for e in (getattr(page, "extrasamples", None) or ())]
    alpha = sum(1 for e in extra if e in (1, 2))  # associated or unassociated alpha
    n = int(series.shape[s])
    return axes, (n - alpha if 0 < alpha < n else None)


def write_tiff(
    path: os.PathLike | str,
    data: np.ndarray,
    *,
    pixel_size: Optional[float] = None,
    channel_names: Optional[Sequence[str]] = None,
    overwrite: bool = False,
    compression: Optional[str] = "zlib",
) -> Path:
    """Write an array as an OME-TIFF, atomically.

    The OME metadata carry the axes, the pixel size and the channel names (Fiji's
    Bio-Formats, QuPath, napari and :func:`read_tiff` read them); the pixel size
    is also stored as TIFF resolution, which plain ImageJ reads.

    Parameters
    ----------
    path : path-like
        Destination (``.tif``/``.tiff``; ``.ome.tif`` is the usual name).
    data : ndarray of shape (M, N) or (P, M, N)
        uint8, uint16, float32, int32 or uint32 data (other dtypes are refused).
    pixel_size : float, optional
        Micrometres per pixel.
    channel_names : sequence of str, optional
        Names of the P planes of a (P, M, N) array, which are then channels
        (axes ``CYX``); without names a (P, M, N) array is a stack (``ZYX``).
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    Path
        The written path.

    Examples
    --------
    >>> import tempfile
    >>> p = write_tiff(Path(tempfile.mkdtemp()) / "x.ome.tif", np.zeros((2, 4, 4), np.uint16),
    ...                pixel_size=0.5, channel_names=["DNA", "ER"])
    >>> meta = read_tiff(p)[1]
    >>> meta["axes"], meta["pixel_size"], meta["channel_names"]
    ('CYX', 0.5, ['DNA', 'ER'])
    """
    import tifffile

    data = np.asarray(data)
    if data.dtype not in (np.uint8, np.uint16, np.float32, np.int32, np.uint32):
        raise TypeError(
            f"cannot write dtype {data.dtype} to TIFF; expected uint8, uint16, float32, int32 or uint32"
        )
    if data.ndim not in (2, 3):
        raise ValueError(f"expected a 2D or 3D array, got shape {data.shape}")
    metadata: dict[str, Any] = {"axes": "YX" if data.ndim == 2 else "ZYX"}
    if channel_names is not None:
        names = [str(n) for n in channel_names]
        if data.ndim != 3 or len(names) != data.shape[0]:
            raise ValueError(f"{len(names)} channel names given for an array of shape {data.shape}; expected one "
                             "name per plane of a (C, M, N) array")
        metadata["axes"] = "CYX"
        metadata["Channel"] = {"Name": names}
    kwargs: dict[str, Any] = {"compression": compression, "photometric": "minisblack"}
    if pixel_size is not None:
        if not pixel_size > 0:
            raise ValueError(f"pixel_size must be positive, got {pixel_size}")
        metadata.update(PhysicalSizeX=float(pixel_size), PhysicalSizeXUnit="µm",
                        PhysicalSizeY=float(pixel_size), PhysicalSizeYUnit="µm")
        kwargs["resolution"] = (1e4 / pixel_size, 1e4 / pixel_size)
        kwargs["resolutionunit"] = "CENTIMETER"
    # The OME UUID from the content, so that the same data and metadata give the same bytes (resumed
    # dataset exports are compared file by file).
    import hashlib
    import uuid

    digest = hashlib.sha256(np.ascontiguousarray(data).tobytes())
    digest.update(json.dumps([str(data.dtype), data.shape, metadata], sort_keys=True).encode())
    metadata["UUID"] = f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_OID, digest.hexdigest())}"
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as fh:
            tifffile.imwrite(fh, data, ome=True, metadata=metadata, **kwargs)
    return Path(path)


def is_ome_zarr(path: os.PathLike | str) -> bool:
    """True for a folder holding an OME-Zarr image (``multiscales`` in its zarr v2 or v3 attributes)."""
    p = Path(path)
    if not p.is_dir():
        return False
    for name in (".zattrs", "zarr.json"):
        f = p / name
        if f.is_file():
            try:
                doc = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return False
            attrs = doc.get("attributes", doc) if name == "zarr.json" else doc
            return isinstance(attrs, dict) and "multiscales" in attrs.get("ome", attrs)
    return False


_UM = {"micrometer": 1.0, "micron": 1.0, "nanometer": 1e-3, "millimeter": 1e3}


def _read_ome_zarr(path: Path) -> tuple[np.ndarray, dict]:
    """The full-resolution level of an OME-Zarr image, with axes, pixel size and channel names."""
    try:
        import zarr
    except ImportError as exc:
        raise ValueError(f"{path} is an OME-Zarr image; reading it needs the zarr package (pip install zarr)") from exc
    try:
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
        attrs = attrs.get("ome", attrs)
        ms = attrs["multiscales"][0]
        level = ms["datasets"][0]
        arr = group[level["path"]]
        shape, dtype = tuple(arr.shape), np.dtype(arr.dtype)
    except (KeyError, IndexError, TypeError, ValueError, OSError) as exc:
        raise ValueError(f"{path} is not a readable OME-Zarr image: {first_line(exc)}") from exc
    require_memory(float(np.prod(shape)) * dtype.itemsize, what=f"reading {path} ({shape} {dtype})",
                   hint="crop or downsample the image first, or read it in tiles")
    data = np.asarray(arr[...])
    axes_meta = ms.get("axes") or []
    names = [a["name"] if isinstance(a, dict) else str(a) for a in axes_meta]
    meta = {"axes": "".join(n[0].upper() for n in names) if len(names) == data.ndim else "",
            "pixel_size": None, "unit": None, "channel_names": None}
    scale = next((t.get("scale") for t in level.get("coordinateTransformations", []) if t.get("type") == "scale"),
                 None)
    if scale and "x" in names and len(scale) == len(names):
        ax = axes_meta[names.index("x")]
        factor = _UM.get(ax.get("unit", "") if isinstance(ax, dict) else "")
        if factor is not None:
            meta["pixel_size"], meta["unit"] = float(scale[names.index("x")]) * factor, "µm"
    channels = (attrs.get("omero") or {}).get("channels")
    if isinstance(channels, list):
        meta["channel_names"] = [str(c.get("label", i)) for i, c in enumerate(channels)] or None
    return data, meta
