"""Counting without weights: Laplacian-of-Gaussian peaks, and cell-diameter estimation.

numpy/scipy/scikit-image only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy.ndimage import gaussian_laplace

from .preprocess import normalize_image, split_planes

__all__ = ["ClassicParams", "classic_peaks", "estimate_diameter", "log_response"]

_SQRT2 = float(np.sqrt(2.0))


@dataclass(frozen=True)
class ClassicParams:
    """Parameters of the classic (Laplacian-of-Gaussian) counter.

    Parameters
    ----------
    diameter : float
        Cell diameter in pixels; the LoG scale is ``sigma_factor * diameter``.
    threshold : float or None
        Minimum scale-normalised LoG response of a peak on the normalised image
        (a bright flat disk of contrast 1 gives about 0.74). None: automatic, the
        larger of ``min_threshold`` and ``noise_factor`` times the robust noise
        level of the response.
    min_distance : float or None
        Minimum distance between two peaks in pixels; None: ``0.4 * diameter``.
    min_threshold : float
        Floor of the automatic threshold.
    noise_factor : float
        Multiple of the response's robust standard deviation used by the automatic threshold.
    sigma_factor : float
        LoG scale as a fraction of the diameter. ``1 / (2 sqrt 2)`` (0.354) is the
        best scale for an isolated flat disk; the smaller default separates
        touching cells better.

    Examples
    --------
    >>> ClassicParams(diameter=12).sigma
    3.0
    >>> ClassicParams(diameter=0)
    Traceback (most recent call last):
    ...
    ValueError: diameter must be a positive number of pixels, got 0
    """

    diameter: float = 15.0
    threshold: Optional[float] = None
    min_distance: Optional[float] = None
    min_threshold: float = 0.08
    noise_factor: float = 5.0
    sigma_factor: float = 0.25

    def __post_init__(self) -> None:
        if not (isinstance(self.diameter, (int, float)) and np.isfinite(self.diameter) and self.diameter > 0):
            raise ValueError(f"diameter must be a positive number of pixels, got {self.diameter!r}")
        if self.threshold is not None and not self.threshold >= 0:
            raise ValueError(f"threshold must be >= 0 or None, got {self.threshold!r}")
        if self.min_distance is not None and not self.min_distance >= 1:
            raise ValueError(f"min_distance must be >= 1 pixel or None, got {self.min_distance!r}")
        if not 0.05 <= self.sigma_factor <= 1:
            raise ValueError(f"sigma_factor must be in [0.05, 1], got {self.sigma_factor!r}")
        if not self.min_threshold >= 0 or not self.noise_factor >= 0:
            raise ValueError(
                f"min_threshold and noise_factor must be >= 0, got {self.min_threshold!r}, {self.noise_factor!r}"
            )

    @property
    def sigma(self) -> float:
        """LoG scale in pixels."""
        return self.diameter * self.sigma_factor

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def log_response(plane: np.ndarray, sigma: float) -> np.ndarray:
    """Scale-normalised, sign-flipped LoG ``-sigma^2 * LoG(plane)`` (bright blobs positive).

    Examples
    --------
    >>> img = np.zeros((41, 41), np.float32); img[15:26, 15:26] = 1
    >>> r = log_response(img, 4.0)
    >>> tuple(int(i) for i in np.unravel_index(np.argmax(r), r.shape))
    (20, 20)
    """
    return (-(sigma ** 2) * gaussian_laplace(np.asarray(plane, np.float32), sigma)).astype(np.float32)


def _log_gain(sigma: float) -> float:
    """Standard deviation of :func:`log_response` of unit white noise."""
    n = np.random.default_rng(0).standard_normal((128, 128)).astype(np.float32)
    return float(log_response(n, sigma)[32:-32, 32:-32].std())


def _robust_std(x: np.ndarray) -> float:
    step = max(1, int(np.sqrt(x.size / 250_000)))
    s = x[::step, ::step]
    return float(1.4826 * np.median(np.abs(s - np.median(s))))


def classic_peaks(plane: np.ndarray, params: ClassicParams | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cell centres of one normalised plane as LoG peaks.

    Parameters
    ----------
    plane : ndarray of shape (M, N)
        Normalised image (see :func:`~cellsynth.count.preprocess.normalize_image`).
    params : ClassicParams, optional

    Returns
    -------
    points : ndarray of shape (K, 2)
        ``(row, col)`` of the detected cells.
    scores : ndarray of shape (K,)
        LoG response at each point.

    Examples
    --------
    >>> from skimage.draw import disk
    >>> img = np.zeros((64, 64), np.float32)
    >>> for rc in [(15, 15), (15, 45), (45, 30)]:
    ...     img[disk(rc, 6)] = 1.0
    >>> pts, _ = classic_peaks(img, ClassicParams(diameter=12))
    >>> sorted(map(tuple, pts.astype(int).tolist()))
    [(15, 15), (15, 45), (45, 30)]
    """
    from scipy.ndimage import gaussian_filter
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu

    params = params or ClassicParams()
    plane = np.asarray(plane, np.float32)
    r = log_response(plane, params.sigma)
    thr = params.threshold
    if thr is None:
        # Pixel noise from neighbour differences on the background (below Otsu's
        # threshold of the smoothed plane), propagated through the LoG filter.
        smooth = gaussian_filter(plane, max(0.5, params.sigma / 2))
        step = max(1, int(np.sqrt(smooth.size / 250_000)))
        sample = smooth[::step, ::step]
        fg = threshold_otsu(sample) if np.ptp(sample) > 0 else np.inf
        diff = (plane[:, 1:] - plane[:, :-1])[::step, ::step]
        diff = diff[smooth[:, :-1][::step, ::step] < fg]
        pixel_noise = _robust_std(diff[:, None]) / _SQRT2 if diff.size > 16 else 0.0
        noise = pixel_noise * _log_gain(params.sigma)
        thr = max(params.min_threshold, params.noise_factor * noise)
    md = params.min_distance if params.min_distance is not None else 0.4 * params.diameter
    pts = peak_local_max(r, min_distance=max(1, int(round(md))), threshold_abs=thr, exclude_border=False)
    pts = pts.reshape(-1, 2)
    return pts.astype(float), r[pts[:, 0], pts[:, 1]].astype(float)


def estimate_diameter(
    image: np.ndarray,
    *,
    channel: Optional[int] = None,
    channel_axis: Optional[int] = None,
    min_diameter: float = 4.0,
    max_diameter: float = 80.0,
) -> float:
    """Guess the typical cell diameter in pixels from the scale-space LoG response.

    The plane (the middle one of a stack) is normalised; the scale-normalised
    LoG response is computed at log-spaced scales; blobs are the spatial maxima
    of the best response over scales, and the diameter is the response-weighted
    median of ``2 sqrt(2) sigma`` at their best scale. Large images are analysed
    on a central 512x512 crop.

    Parameters
    ----------
    image : ndarray
        2D image, multichannel image or stack (see :func:`~cellsynth.count.preprocess.split_planes`).
    channel, channel_axis : int, optional
        Which channel to use.
    min_diameter, max_diameter : float
        Search range in pixels.

    Returns
    -------
    float
        Estimated diameter in pixels.

    Raises
    ------
    ValueError
        No blob-like structure was found (e.g. a flat image).

    Examples
    --------
    >>> from skimage.draw import disk
    >>> img = np.zeros((128, 128), np.float32)
    >>> for r in range(16, 128, 32):
    ...     for c in range(16, 128, 32):
    ...         img[disk((r, c), 7)] = 1.0
    >>> 11 < estimate_diameter(img) < 17
    True
    """
    from skimage.feature import peak_local_max

    if not 1 <= min_diameter < max_diameter:
        raise ValueError(f"need 1 <= min_diameter < max_diameter, got {min_diameter}, {max_diameter}")
    planes, _ = split_planes(image, channel=channel, channel_axis=channel_axis)
    plane = planes[len(planes) // 2]
    rows, cols = plane.shape
    size = 512
    r0, c0 = max(0, (rows - size) // 2), max(0, (cols - size) // 2)
    from scipy.ndimage import gaussian_filter

    plane = gaussian_filter(normalize_image(plane[r0:r0 + size, c0:c0 + size]), 1.0)
    max_d = min(max_diameter, max(min_diameter * 1.5, min(plane.shape) / 2))
    diameters = np.exp(np.linspace(np.log(min_diameter), np.log(max_d), 16))
    stack = np.stack([log_response(plane, d / (2 * _SQRT2)) for d in diameters])
    best = stack.max(axis=0)
    which = stack.argmax(axis=0)
    noise = _robust_std(best)
    thr = max(0.05, 4 * noise, 0.2 * float(best.max()))
    pts = peak_local_max(best, min_distance=max(2, int(min_diameter / 2)), threshold_abs=thr, exclude_border=False)
    if len(pts) == 0:
        raise ValueError("could not estimate a cell diameter: no blob-like cells found in the image")
    k = which[pts[:, 0], pts[:, 1]]
    if np.any(k > 0):  # blobs at the smallest scale are mostly noise
        pts, k = pts[k > 0], k[k > 0]
    d = diameters[k]
    w = best[pts[:, 0], pts[:, 1]]
    order = np.argsort(d)
    cum = np.cumsum(w[order])
    return float(d[order][np.searchsorted(cum, cum[-1] / 2)])
