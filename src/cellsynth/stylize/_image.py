"""Pure numpy helpers: value ranges, working sizes, resizing and padding (no torch)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ValueRange", "to_unit_rgb", "from_unit_rgb", "working_shape", "to_working", "from_working"]


@dataclass(frozen=True)
class ValueRange:
    """How an input image maps to [0, 1] and back."""

    low: float
    high: float
    dtype: str
    gray: bool


def to_unit_rgb(image: np.ndarray) -> tuple[np.ndarray, ValueRange]:
    """An image as float32 RGB in [0, 1], and how to map results back.

    uint8 images use [0, 255]; other images their own min and max.

    Parameters
    ----------
    image : ndarray of shape (M, N), (M, N, 1), (M, N, 3) or (M, N, 4)

    Returns
    -------
    rgb : ndarray of shape (M, N, 3), float32
    value_range : ValueRange

    Raises
    ------
    ValueError
        If the shape is not an image, or the image is smaller than 2x2 or not finite.

    Examples
    --------
    >>> rgb, vr = to_unit_rgb(np.array([[0, 128], [255, 64]], np.uint8))
    >>> rgb.shape, float(rgb.max()), vr.gray, vr.high
    ((2, 2, 3), 1.0, True, 255.0)
    """
    a = np.asarray(image)
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise TypeError(f"image must be an integer or float array, got dtype {a.dtype}")
    if a.ndim == 3 and a.shape[-1] in (1, 3, 4):
        gray = a.shape[-1] == 1
        a = a[..., :1] if gray else a[..., :3]
    elif a.ndim == 2:
        gray = True
        a = a[..., None]
    else:
        raise ValueError(f"image must have shape (M, N) or (M, N, 1|3|4), got {a.shape}")
    if min(a.shape[:2]) < 2:
        raise ValueError(f"image must be at least 2x2 pixels, got {a.shape[:2]}")
    f = a.astype(np.float64)
    if not np.isfinite(f).all():
        raise ValueError("image contains NaN or infinite values")
    if a.dtype == np.uint8:
        low, high = 0.0, 255.0
    else:
        low, high = float(f.min()), float(f.max())
        if high <= low:
            high = low + 1.0
    unit = ((f - low) / (high - low)).astype(np.float32)
    if gray:
        unit = np.repeat(unit, 3, axis=-1)
    return unit, ValueRange(low, high, a.dtype.str, gray)


def from_unit_rgb(rgb: np.ndarray, value_range: ValueRange) -> np.ndarray:
    """Map float RGB in [0, 1] back to the input's value range, dtype and channels.

    Examples
    --------
    >>> x = np.array([[3, 7], [5, 9]], np.uint16)
    >>> rgb, vr = to_unit_rgb(x)
    >>> from_unit_rgb(rgb, vr).tolist()
    [[3, 7], [5, 9]]
    """
    out = np.clip(np.asarray(rgb, dtype=np.float64), 0.0, 1.0)
    if value_range.gray:
        out = out.mean(axis=-1)
    out = out * (value_range.high - value_range.low) + value_range.low
    dtype = np.dtype(value_range.dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        out = np.clip(np.round(out), info.min, info.max)
    return out.astype(dtype)


def working_shape(shape: tuple[int, int], *, size: int = 512, resize: str = "keep") -> tuple[tuple, tuple]:
    """Resized and padded shapes of the working image.

    Parameters
    ----------
    shape : (int, int)
        Input (rows, cols).
    size : int
        Long side after resizing (0: no resizing).
    resize : {"keep", "squash"}
        Keep the aspect ratio then pad up to multiples of 8, or squash to a
        ``size x size`` square (size rounded down to a multiple of 8).

    Returns
    -------
    resized : (int, int)
    padded : (int, int)
        Multiples of 8.

    Examples
    --------
    >>> working_shape((600, 800), size=512)
    ((384, 512), (384, 512))
    >>> working_shape((100, 30), size=64)
    ((64, 19), (64, 24))
    >>> working_shape((600, 800), size=512, resize="squash")
    ((512, 512), (512, 512))
    """
    rows, cols = int(shape[0]), int(shape[1])
    if resize == "squash":
        side = max(8, size // 8 * 8)
        return (side, side), (side, side)
    if resize != "keep":
        raise ValueError(f"resize must be 'keep' or 'squash', got {resize!r}")
    if size:
        scale = size / max(rows, cols)
        rows, cols = max(1, round(rows * scale)), max(1, round(cols * scale))
    padded = (max(8, -(-rows // 8) * 8), max(8, -(-cols // 8) * 8))
    return (rows, cols), padded


def _resize(image: np.ndarray, shape: tuple) -> np.ndarray:
    from skimage.transform import resize

    if tuple(image.shape[:2]) == tuple(shape):
        return image
    down = shape[0] < image.shape[0] or shape[1] < image.shape[1]
    return resize(image, tuple(shape) + image.shape[2:], order=1, anti_aliasing=down,
                  preserve_range=True).astype(np.float32)


def to_working(rgb: np.ndarray, *, size: int = 512, resize: str = "keep") -> tuple[np.ndarray, tuple]:
    """Resize a float RGB image and pad it (mirrored) to multiples of 8.

    Returns the working image and the resized (unpadded) shape.

    Examples
    --------
    >>> work, inner = to_working(np.zeros((100, 30, 3), np.float32), size=64)
    >>> work.shape, inner
    ((64, 24, 3), (64, 19))
    """
    resized, padded = working_shape(rgb.shape[:2], size=size, resize=resize)
    out = _resize(rgb, resized)
    pad = ((0, padded[0] - resized[0]), (0, padded[1] - resized[1]), (0, 0))
    return np.pad(out, pad, mode="symmetric").astype(np.float32), resized


def from_working(rgb: np.ndarray, inner: tuple, shape: tuple) -> np.ndarray:
    """Crop the padding off a working-size result and resize it to `shape`.

    Examples
    --------
    >>> from_working(np.zeros((64, 24, 3), np.float32), (64, 19), (100, 30)).shape
    (100, 30, 3)
    """
    return _resize(rgb[: inner[0], : inner[1]], tuple(shape[:2]))
