"""Counting without weights: seeded watershed in an Otsu mask, and cell-diameter estimation.

numpy/scipy/scikit-image only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy.ndimage import gaussian_laplace

from .preprocess import normalize_image, split_planes

__all__ = ["ClassicParams", "classic_peaks", "estimate_diameter", "foreground_threshold", "log_response", "segment_nuclei"]

_SQRT2 = float(np.sqrt(2.0))


@dataclass(frozen=True)
class ClassicParams:
    """Parameters of the classic counter (seeded watershed in an Otsu mask, Voronoi-Otsu style).

    Every length scales with the cell diameter, so one diameter sets the counter.

    Parameters
    ----------
    diameter : float
        Typical cell diameter in pixels.
    spot_sigma : float
        Gaussian smoothing of the seed image as a fraction of the diameter:
        large enough that the texture of one nucleus gives one maximum.
    outline_sigma : float
        Gaussian smoothing of the mask image as a fraction of the diameter.
    min_distance : float or None
        Minimum distance between two seeds in pixels; None: ``0.35 * diameter``.
    min_area : float
        Smallest object kept, as a fraction of the area of a disk of ``diameter``
        (smaller objects are debris).
    threshold : float or None
        Foreground threshold on the normalised image; None: Otsu's threshold of
        the smoothed image.

    Examples
    --------
    >>> ClassicParams(diameter=12).min_distance_px
    4.2
    >>> ClassicParams(diameter=0)
    Traceback (most recent call last):
    ...
    ValueError: diameter must be a positive number of pixels, got 0
    """

    diameter: float = 15.0
    spot_sigma: float = 0.25
    outline_sigma: float = 0.08
    min_distance: Optional[float] = None
    min_area: float = 0.15
    threshold: Optional[float] = None

    def __post_init__(self) -> None:
        if not (isinstance(self.diameter, (int, float)) and np.isfinite(self.diameter) and 0 < self.diameter <= 5000):
            raise ValueError(f"diameter must be a positive number of pixels, got {self.diameter!r}")
        if self.min_distance is not None and not 1 <= self.min_distance < np.inf:
            raise ValueError(f"min_distance must be >= 1 pixel or None, got {self.min_distance!r}")
        for name in ("spot_sigma", "outline_sigma"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1] (a fraction of the diameter), got {getattr(self, name)!r}")
        if not 0 <= self.min_area <= 1:
            raise ValueError(f"min_area must be in [0, 1] (a fraction of a cell's area), got {self.min_area!r}")
        if self.threshold is not None and not np.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number or None, got {self.threshold!r}")

    @property
    def min_distance_px(self) -> float:
        """Minimum seed distance in pixels."""
        return float(self.min_distance) if self.min_distance is not None else round(0.35 * self.diameter, 6)

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


def _robust_std(x: np.ndarray) -> float:
    step = max(1, int(np.sqrt(x.size / 250_000)))
    s = x[::step, ::step]
    return float(1.4826 * np.median(np.abs(s - np.median(s))))


def foreground_threshold(plane: np.ndarray, smooth: np.ndarray, *, sigma: float = 0.0,
                         min_contrast: float = 4.0) -> float:
    """Otsu's threshold of ``smooth``, or ``inf`` when its two classes differ by noise only.

    ``smooth`` is ``plane`` smoothed by a Gaussian of ``sigma`` pixels (0: not
    smoothed). The foreground must be brighter than the background by at least
    ``min_contrast`` times the noise left in ``smooth`` (the pixel noise of
    ``plane``, from neighbour differences, times the Gaussian's noise gain);
    otherwise the image holds no cells and nothing is foreground.

    Examples
    --------
    >>> noise = np.random.default_rng(0).normal(0, 1, (64, 64)).astype(np.float32)
    >>> foreground_threshold(noise, noise)
    inf
    >>> cells = noise.copy(); cells[20:30, 20:30] += 20
    >>> bool(foreground_threshold(cells, cells) < 20)
    True
    """
    from skimage.filters import threshold_otsu

    step = max(1, int(np.sqrt(smooth.size / 1_000_000)))
    sample = np.asarray(smooth)[::step, ::step]
    if np.ptp(sample) <= 1e-6:
        return np.inf
    thr = float(threshold_otsu(sample))
    fg, bg = sample[sample > thr], sample[sample <= thr]
    if fg.size == 0 or bg.size == 0:
        return np.inf
    p = np.asarray(plane, np.float32)[::step, ::step]
    diffs = np.concatenate([(p[:, 1:] - p[:, :-1]).ravel(), (p[1:] - p[:-1]).ravel()])
    noise = _robust_std(diffs[:, None]) / _SQRT2
    if sigma > 0:
        noise *= min(1.0, 1.0 / (2.0 * np.sqrt(np.pi) * sigma))
    if float(np.median(fg)) - float(np.median(bg)) < min_contrast * noise:
        return np.inf
    return thr


def segment_nuclei(plane: np.ndarray, params: ClassicParams | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Label the nuclei of one normalised plane: seeded watershed inside Otsu's foreground.

    The plane is smoothed twice: with ``spot_sigma * diameter`` for the seeds (local
    maxima at least ``min_distance`` apart, inside the foreground) and with
    ``outline_sigma * diameter`` for the foreground mask (Otsu's threshold, or
    ``params.threshold``). Each seed grows by watershed on the smoothed intensity
    within the mask; objects smaller than ``min_area`` of a cell's area are dropped.

    Parameters
    ----------
    plane : ndarray of shape (M, N)
        Normalised image (see :func:`~cellsynth.count.preprocess.normalize_image`).
    params : ClassicParams, optional

    Returns
    -------
    labels : ndarray of shape (M, N), int32
        0 for background, 1..K for the kept objects.
    peaks : ndarray of shape (K,)
        Smoothed intensity at each object's seed, over the foreground threshold
        (1 at the threshold, 2 at twice it...).

    Examples
    --------
    >>> from skimage.draw import disk
    >>> img = np.zeros((64, 64), np.float32)
    >>> for rc in [(15, 15), (15, 45), (45, 30)]:
    ...     img[disk(rc, 6)] = 1.0
    >>> labels, peaks = segment_nuclei(img, ClassicParams(diameter=12))
    >>> int(labels.max()), peaks.shape
    (3, (3,))
    """
    from scipy.ndimage import gaussian_filter
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    params = params or ClassicParams()
    plane = np.asarray(plane, np.float32)
    d = params.diameter
    seeds_img = gaussian_filter(plane, max(0.5, params.spot_sigma * d))
    outline_sigma = max(0.5, params.outline_sigma * d)
    outline = gaussian_filter(plane, outline_sigma)
    if params.threshold is not None:
        thr = float(params.threshold)
    else:
        thr = foreground_threshold(plane, outline, sigma=outline_sigma)
    mask = outline > thr
    empty = np.zeros(plane.shape, np.int32), np.zeros(0)
    if not mask.any():
        return empty
    floor = float(seeds_img[mask].min())  # every seed inside the mask is at least this bright
    pk = peak_local_max(seeds_img, min_distance=max(1, int(round(params.min_distance_px))), threshold_abs=floor,
                        exclude_border=False).reshape(-1, 2)
    pk = pk[mask[pk[:, 0], pk[:, 1]]]
    if len(pk) == 0:
        return empty
    markers = np.zeros(plane.shape, np.int32)
    markers[pk[:, 0], pk[:, 1]] = np.arange(1, len(pk) + 1, dtype=np.int32)
    labels = watershed(-seeds_img, markers, mask=mask).astype(np.int32)
    areas = np.bincount(labels.ravel(), minlength=len(pk) + 1)[1:]
    keep = areas >= params.min_area * np.pi * d * d / 4
    lut = np.zeros(len(pk) + 1, np.int32)
    lut[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    peaks = seeds_img[pk[keep, 0], pk[keep, 1]] / max(thr, 1e-6)
    return lut[labels], peaks.astype(float)


def classic_peaks(plane: np.ndarray, params: ClassicParams | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cell centres of one normalised plane: the centroids of :func:`segment_nuclei`'s objects.

    Parameters
    ----------
    plane : ndarray of shape (M, N)
        Normalised image (see :func:`~cellsynth.count.preprocess.normalize_image`).
    params : ClassicParams, optional

    Returns
    -------
    points : ndarray of shape (K, 2)
        ``(row, col)``: the intensity-weighted centroid of each object.
    scores : ndarray of shape (K,)
        The object's seed intensity over the foreground threshold (see :func:`segment_nuclei`).

    Examples
    --------
    >>> from skimage.draw import disk
    >>> img = np.zeros((64, 64), np.float32)
    >>> for rc in [(15, 15), (15, 45), (45, 30)]:
    ...     img[disk(rc, 6)] = 1.0
    >>> pts, _ = classic_peaks(img, ClassicParams(diameter=12))
    >>> sorted(map(tuple, np.round(pts).astype(int).tolist()))
    [(15, 15), (15, 45), (45, 30)]
    """
    from scipy.ndimage import center_of_mass

    plane = np.asarray(plane, np.float32)
    labels, peaks = segment_nuclei(plane, params)
    k = len(peaks)
    if k == 0:
        return np.zeros((0, 2)), np.zeros(0)
    weights = np.clip(plane - plane.min(), 0, None) + 1e-6
    pts = np.array(center_of_mass(weights, labels, np.arange(1, k + 1)), dtype=float).reshape(-1, 2)
    return pts, peaks


def _diameter_of_objects(plane: np.ndarray, diameter: float) -> Optional[float]:
    """Median equivalent diameter of the objects segmented at ``diameter``; None when there are none."""
    labels, peaks = segment_nuclei(plane, ClassicParams(diameter=diameter))
    if len(peaks) == 0:
        return None
    areas = np.bincount(labels.ravel())[1:]
    return float(np.median(2.0 * np.sqrt(areas / np.pi)))


def _log_diameter(plane: np.ndarray, min_d: float, max_d: float) -> Optional[float]:
    """Response-weighted median blob diameter over a scale-normalised LoG scale space."""
    from skimage.feature import peak_local_max

    diameters = np.exp(np.linspace(np.log(min_d), np.log(max_d), 16))
    stack = np.stack([_coarse_log(plane, d / (2 * _SQRT2)) for d in diameters])
    best = stack.max(axis=0)
    which = stack.argmax(axis=0)
    thr = max(0.05, 4 * _robust_std(best), 0.2 * float(best.max()))
    pts = peak_local_max(best, min_distance=max(2, int(min_d / 2)), threshold_abs=thr, exclude_border=False)
    if len(pts) == 0:
        return None
    k = which[pts[:, 0], pts[:, 1]]
    if np.any(k > 0):  # blobs at the smallest scale are mostly noise
        pts, k = pts[k > 0], k[k > 0]
    d = diameters[k]
    w = best[pts[:, 0], pts[:, 1]]
    order = np.argsort(d)
    cum = np.cumsum(w[order])
    return float(d[order][np.searchsorted(cum, cum[-1] / 2)])


def _coarse_log(plane: np.ndarray, sigma: float) -> np.ndarray:
    """:func:`log_response` at large scales computed on a block-averaged plane and brought back."""
    k = int(sigma // 3)
    if k < 2:
        return log_response(plane, sigma)
    from skimage.measure import block_reduce
    from skimage.transform import resize

    small = block_reduce(plane, (k, k), np.mean)
    r = log_response(small, sigma / k)
    return resize(r, plane.shape, order=1, preserve_range=True).astype(np.float32)


def _component_diameter(plane: np.ndarray) -> Optional[float]:
    """Median equivalent diameter of the connected foreground components (Otsu)."""
    from scipy.ndimage import binary_opening, gaussian_filter, label

    smooth = gaussian_filter(plane, 1.0)
    thr = foreground_threshold(plane, smooth, sigma=1.0)
    if not np.isfinite(thr):
        return None
    mask = binary_opening(smooth > thr)
    lab, n = label(mask)
    areas = np.bincount(lab.ravel())[1:]
    areas = areas[areas >= 12]
    if len(areas) == 0:
        return None
    return float(np.median(2.0 * np.sqrt(areas / np.pi)))


def estimate_diameter(
    image: np.ndarray,
    *,
    channel: Optional[int] = None,
    channel_axis: Optional[int] = None,
    min_diameter: float = 4.0,
    max_diameter: float = 150.0,
    max_pixels: int = 640 * 640,
) -> float:
    """Estimate the typical (median) cell diameter in pixels.

    Two first guesses, the response-weighted median blob size of a scale-normalised
    LoG scale space and the median size of the connected foreground components,
    start a fixed-point iteration: segment the nuclei at the current diameter
    (:func:`segment_nuclei`) and take the median equivalent diameter of the
    objects, until it changes by less than 2 %. When small debris outnumbers
    large nuclei the iteration can settle on the debris; restarts from 2, 4 and 8
    times that size look for a larger size of convex, nucleus-like objects
    (see :func:`_larger_mode`). The plane (the middle one of a stack) is analysed
    on a central crop of at most ``max_pixels`` pixels.

    Parameters
    ----------
    image : ndarray
        2D image, multichannel image or stack (see :func:`~cellsynth.count.preprocess.split_planes`).
    channel, channel_axis : int, optional
        Which channel to use.
    min_diameter, max_diameter : float
        Search range in pixels.
    max_pixels : int
        Largest area analysed (a central crop of larger images).

    Returns
    -------
    float
        Estimated diameter in pixels.

    Raises
    ------
    ValueError
        No cell-like structure was found (e.g. a flat image).

    Examples
    --------
    >>> from skimage.draw import disk
    >>> img = np.zeros((128, 128), np.float32)
    >>> for r in range(16, 128, 32):
    ...     for c in range(16, 128, 32):
    ...         img[disk((r, c), 7)] = 1.0
    >>> 13 < estimate_diameter(img) < 16
    True
    """
    if not 1 <= min_diameter < max_diameter:
        raise ValueError(f"need 1 <= min_diameter < max_diameter, got {min_diameter}, {max_diameter}")
    planes, _ = split_planes(image, channel=channel, channel_axis=channel_axis)
    plane = planes[len(planes) // 2]
    rows, cols = plane.shape
    side_r = min(rows, int(np.sqrt(max_pixels * rows / cols)) + 1)
    side_c = min(cols, max_pixels // max(side_r, 1) + 1)
    r0, c0 = (rows - side_r) // 2, (cols - side_c) // 2
    plane = normalize_image(plane[r0:r0 + side_r, c0:c0 + side_c])
    if np.ptp(plane) <= 1e-6:
        raise ValueError("could not estimate a cell diameter: no blob-like cells found in the image (it is flat)")
    comp = _component_diameter(plane)
    if comp is None:
        raise ValueError("could not estimate a cell diameter: no blob-like cells stand out from the noise")
    log_max = min(max_diameter, max(min_diameter * 1.5, max(plane.shape) / 2))
    guesses = [g for g in (_log_diameter(plane, min_diameter, log_max), comp) if g]
    if not guesses:
        raise ValueError("could not estimate a cell diameter: no blob-like cells found in the image")
    d = _fixed_point(plane, float(np.clip(max(guesses), min_diameter, max_diameter)), min_diameter, max_diameter)
    return _larger_mode(plane, d, min_diameter, max_diameter)


def _fixed_point(plane: np.ndarray, d: float, min_d: float, max_d: float, floor: float = 0.0) -> float:
    """Iterate ``d <- median diameter of the objects segmented at d`` until it moves by <= 2 %.

    Stops early when ``d`` falls below ``floor`` (a restart heading back to a known size).
    """
    for _ in range(10):
        nxt = _diameter_of_objects(plane, d)
        if nxt is None:
            break
        nxt = float(np.clip(nxt, min_d, max_d))
        done = abs(nxt - d) <= 0.02 * d or nxt < floor
        d = nxt
        if done:
            break
    return d


def _shape_stats(plane: np.ndarray, d: float) -> tuple[float, float, int]:
    """Median solidity and median minor/major axis ratio of the objects segmented at ``d``, and their number."""
    from skimage.measure import regionprops

    labels, peaks = segment_nuclei(plane, ClassicParams(diameter=d))
    if len(peaks) == 0:
        return 0.0, 0.0, 0
    props = regionprops(labels)
    sol = [r.solidity for r in props]
    ratio = [r.axis_minor_length / r.axis_major_length if r.axis_major_length > 0 else 1.0 for r in props]
    return float(np.median(sol)), float(np.median(ratio)), len(props)


def _larger_mode(plane: np.ndarray, d0: float, min_d: float, max_d: float, *, ratio: float = 1.5) -> float:
    """The nuclei's size when ``d0`` is the size of something more numerous but smaller (debris, spots).

    The median object size has more than one fixed point when small bright
    debris outnumbers large nuclei: started small it settles on the debris.
    Started at 2, 4 and 8 times ``d0`` it can settle on a larger size; such a
    size is taken when it is at least ``ratio`` times ``d0``, its objects are
    convex and roundish like nuclei (median solidity >= 0.9 and within 0.02 of
    the most convex segmentation, median minor/major axis ratio >= 0.5: clusters
    and rows of cells merged by too large a size are less convex or elongated),
    there are at least 3 of them and the size is not the search's upper bound.
    The largest such size wins; otherwise ``d0``.
    """
    from skimage.measure import block_reduce

    found = [d0]
    for k in (2, 4, 8):
        start = d0 * k
        if start > max_d:
            break
        # a restart at a large size runs on a block-averaged plane (24-48 px at the start size): same
        # objects, a fraction of the cost
        s = max(1, int(start // 24))
        view = block_reduce(plane, (s, s), np.mean).astype(np.float32) if s > 1 else plane
        f = s * _fixed_point(view, start / s, min_d / s, max_d / s, floor=0.9 * ratio * d0 / s)
        if ratio * d0 <= f < 0.99 * max_d and all(abs(f - g) > 0.1 * g for g in found):
            found.append(f)
    if len(found) == 1:
        return d0
    stats = {f: _shape_stats(plane, f) for f in found}  # at full resolution: solidity drops with block size
    best = max(sol for sol, _, _ in stats.values())
    ok = [f for f, (sol, round_, n) in stats.items()
          if f >= ratio * d0 and n >= 3 and sol >= max(0.9, best - 0.02) and round_ >= 0.5]
    return max(ok) if ok else d0
