"""Reading and writing images, point tables and JSON manifests.

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ._atomic import atomic_path, prepare_output, remove_stale_parts, remove_unfinished

__all__ = [
    "atomic_path",
    "remove_stale_parts",
    "remove_unfinished",
    "prepare_output",
    "require_memory",
    "NotEnoughMemory",
    "read_tiff",
    "read_picture",
    "read_pixel_size",
    "tiff_layout",
    "write_tiff",
    "is_ome_zarr",
    "read_points_csv",
    "write_points_csv",
    "read_json",
    "write_json",
    "path_inside",
    "json_default",
]


class NotEnoughMemory(ValueError):
    """The estimated peak memory of some work exceeds the memory free now."""


def require_memory(nbytes: float, *, what: str, hint: str) -> None:
    """Refuse work whose estimated peak memory exceeds the memory free now.

    Parameters
    ----------
    nbytes : float
        Estimated peak, in bytes.
    what : str
        The work, for the message (e.g. ``"reading x.tif ((40000, 40000) uint8)"``).
    hint : str
        What would make it fit.

    Raises
    ------
    NotEnoughMemory
        A ValueError naming both sizes and the hint.
    """
    import psutil

    free = psutil.virtual_memory().available
    if nbytes > free:
        raise NotEnoughMemory(f"{what} needs about {_size(nbytes)} of memory but only {_size(free)} are free; {hint}")


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (decoders may add several lines of advice)."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)


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


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


# ----------------------------------------------------------------------------- TIFF

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
            if tif.ome_metadata:
                names = re.findall(r'<Channel\b[^>]*?\bName="([^"]*)"', tif.ome_metadata)
                meta["channel_names"] = names or None
            meta["pixel_size"], meta["unit"] = _tiff_pixel_size(tif)
    except NotEnoughMemory:
        raise
    except MemoryError:
        raise NotEnoughMemory(f"reading {path} needs more memory than is free; crop or downsample the image "
                              "first") from None
    except Exception as exc:  # truncated or corrupt files raise whatever the decoder meets (struct.error, ...)
        raise ValueError(f"{path} is not a readable TIFF file: {_first_line(exc)}") from exc
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


def read_pixel_size(path: os.PathLike | str) -> Optional[float]:
    """Micrometres per pixel that a TIFF declares (OME, ImageJ or resolution tags), read from its header; else None."""
    import tifffile

    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff") or not path.is_file():
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            return _tiff_pixel_size(tif)[0]
    except Exception:  # an unreadable header: no pixel size (reading the pixels says what is wrong)
        return None


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
        raise ValueError(f"{path} is not a readable {kind} image: {_first_line(exc)}") from exc


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
        raise ValueError(f"{path} is not a readable OME-Zarr image: {_first_line(exc)}") from exc
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
        raise ValueError(f"{path} is not valid JSON: {_first_line(exc)}") from exc
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
