"""Input handling shared by counting and training: planes, channels, normalisation, rescaling.

numpy/scipy/scikit-image only.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["counter_input", "normalize_image", "split_planes", "rescale_plane"]


def normalize_image(image: np.ndarray, *, low: float = 1.0, high: float = 99.8, clip: float = 5.0,
                    percentiles: Optional[tuple[float, float, float]] = None) -> np.ndarray:
    """Robust percentile normalisation of one plane to float32.

    ``(image - p_low) / (p_high - p_low)``, where the range is at least a fifth of
    ``p99.99 - p_low`` (so that a sparse image, whose ``p_high`` is background,
    is not blown up) and the result is clipped to ``[-clip / 5, clip]``.

    Parameters
    ----------
    image : ndarray of shape (M, N)
        Any real dtype (uint8, uint16, float).
    low, high : float
        Percentiles mapped to 0 and 1.
    clip : float
        Upper clip of the result.
    percentiles : tuple of 3 float, optional
        The image's ``(p_low, p_high, p99.99)`` when computed elsewhere (e.g. once
        over a large image counted in tiles); by default from ``image`` itself.

    Returns
    -------
    ndarray of shape (M, N), float32

    Raises
    ------
    ValueError
        Non-finite values, or percentiles out of order.

    Examples
    --------
    >>> img = np.zeros((10, 10), np.uint16); img[2:5, 2:5] = 1000
    >>> out = normalize_image(img)
    >>> float(out.min()), float(out.max())
    (0.0, 1.0)
    >>> float(normalize_image(np.full((4, 4), 7.0)).max())  # a flat image stays flat
    0.0
    """
    if not 0 <= low < high <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got low={low}, high={high}")
    x = np.asarray(image)
    if x.dtype == bool:
        x = x.astype(np.uint8)
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise TypeError(f"image must hold real numbers, got dtype {x.dtype}")
    # float64 and 32/64-bit integers hold values float32 cannot tell apart (a range of 1e-300, or an
    # offset of 1e12 with a contrast of 200): those are shifted and scaled in float64 first.
    wide = x.dtype.itemsize > 4 or (x.dtype.kind in "iu" and x.dtype.itemsize >= 4)
    if wide and x.dtype.kind in "iu" and percentiles is None and x.size:
        # exact differences from the minimum (modulo 2**64 they cannot wrap), then float64: an offset of
        # 2**62 leaves a contrast of 200 that float64 alone would round away
        x = x.astype(np.uint64) - np.uint64(int(x.min()) % 2**64)
    x = x.astype(np.float64 if wide else np.float32, copy=False)
    if not np.all(np.isfinite(x)):
        raise ValueError("image contains NaN or infinite values; replace them before counting")
    if percentiles is None:
        step = max(1, int(np.sqrt(x.size / 1_000_000)))
        sample = x[::step, ::step] if x.ndim == 2 else x.ravel()[:: step * step]
        lo, hi, top = (float(v) for v in np.percentile(sample, [low, high, 99.99]))
    else:
        lo, hi, top = (float(v) for v in percentiles)
    hi = max(hi, lo + 0.2 * (top - lo))
    span = hi - lo
    if not span > 8 * np.finfo(x.dtype).eps * max(abs(lo), abs(hi)) or not np.isfinite(1.0 / span):
        return np.zeros(x.shape, np.float32)  # flat (to the precision of its type)
    if wide:
        return np.clip((x - lo) * (1.0 / span), -clip / 5.0, clip).astype(np.float32)
    out = (x - np.float32(lo)) * np.float32(1.0 / span)
    return np.clip(out, -clip / 5.0, clip, out=out)


def split_planes(
    image: np.ndarray, *, channel: Optional[int] = None, channel_axis: Optional[int] = None
) -> tuple[np.ndarray, tuple[int, ...]]:
    """Reduce an image to a stack of 2D planes.

    Parameters
    ----------
    image : ndarray
        ``(M, N)``; ``(M, N, C)`` with ``C <= 4`` (RGB/RGBA or a few channels, the
        channel axis being the last one when ``channel_axis`` is None); or a stack
        ``(..., M, N)`` of planes (3D, time), optionally with a channel axis.
    channel : int, optional
        Channel to count. None: the maximum over the channels (fluorescence
        composites) when there is a channel axis.
    channel_axis : int, optional
        Axis holding channels. None: the last axis when its length is <= 4 and
        the image has at least 3 dimensions (colour samples: a 4th sample is
        taken as alpha and left out of the maximum), else no channel axis.

    Returns
    -------
    planes : ndarray of shape (P, M, N)
    lead_shape : tuple of int
        Shape of the stack axes (``()`` for a single 2D image).

    Raises
    ------
    ValueError
        Fewer than 2 spatial dimensions, an empty image, or a bad channel.

    Examples
    --------
    >>> split_planes(np.zeros((5, 6)))[0].shape
    (1, 5, 6)
    >>> planes, lead = split_planes(np.zeros((3, 5, 6)))
    >>> planes.shape, lead
    ((3, 5, 6), (3,))
    >>> split_planes(np.zeros((5, 6, 3)), channel=2)[0].shape
    (1, 5, 6)
    >>> rgba = np.zeros((5, 6, 4), np.uint8); rgba[..., 3] = 255; rgba[2, 2, 0] = 9
    >>> float(split_planes(rgba)[0].max())  # alpha is not signal
    9.0
    """
    x = np.asarray(image)
    if x.ndim < 2:
        raise ValueError(f"image must have at least 2 dimensions (rows, cols), got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"image is empty (shape {x.shape})")
    colour = False
    if channel_axis is None and x.ndim >= 3 and x.shape[-1] <= 4 and min(x.shape[-3:-1]) > 4:
        channel_axis = x.ndim - 1
        colour = x.shape[-1] == 4  # RGBA: the alpha channel is opacity, not signal
    if colour and channel is None:
        x = x[..., :3]
    if channel_axis is not None:
        if not -x.ndim <= channel_axis < x.ndim:
            raise ValueError(f"channel_axis {channel_axis} is out of range for an image of shape {x.shape}")
        x = np.moveaxis(x, channel_axis, -1)
        n_chan = x.shape[-1]
        if channel is None:
            x = x.max(axis=-1)
        else:
            if not -n_chan <= int(channel) < n_chan:
                raise ValueError(f"channel {channel} does not exist; the image has {n_chan} channels (0..{n_chan - 1})")
            x = x[..., int(channel)]
    elif channel not in (None, 0):
        raise ValueError(
            f"channel {channel} was given but the image of shape {image.shape} has no channel axis "
            "(neither declared by the file nor a last axis of 2-4 colour samples)"
        )
    if x.ndim < 2:
        raise ValueError(f"image of shape {image.shape} has no 2D plane left after removing the channel axis")
    lead = tuple(x.shape[:-2])
    return x.reshape((-1,) + x.shape[-2:]), lead


def rescale_plane(plane: np.ndarray, factor: float) -> np.ndarray:
    """Resize a float plane by ``factor`` (anti-aliased when shrinking); identity for 1.

    Examples
    --------
    >>> rescale_plane(np.ones((10, 20), np.float32), 0.5).shape
    (5, 10)
    """
    if abs(factor - 1.0) < 1e-3:
        return plane
    from skimage.transform import resize

    shape = (max(1, int(round(plane.shape[0] * factor))), max(1, int(round(plane.shape[1] * factor))))
    return resize(plane, shape, order=1, anti_aliasing=factor < 1, preserve_range=True).astype(np.float32)


def counter_input(raw: np.ndarray, norm: dict, percentiles=None) -> np.ndarray:
    """The counter's input scaling: robust percentiles (default) or fixed ``(x / range - mean) / std``."""
    if norm.get("mode") != "fixed":
        return normalize_image(raw, low=norm.get("low", 1.0), high=norm.get("high", 99.8), percentiles=percentiles)
    x = np.asarray(raw)
    if not np.all(np.isfinite(x)):
        raise ValueError("image contains NaN or infinite values; replace them before counting")
    span = float(np.iinfo(x.dtype).max) if np.issubdtype(x.dtype, np.integer) else 1.0
    x = x.astype(np.float32) / np.float32(span)
    return (x - np.float32(norm["mean"])) / np.float32(norm["std"])
