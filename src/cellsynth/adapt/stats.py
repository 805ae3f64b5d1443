"""What a set of unlabelled images says about its cells: size, density, foreground.

numpy/scipy/scikit-image only.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

from ..count.classic import ClassicParams, classic_peaks, estimate_diameter
from ..count.preprocess import normalize_image, split_planes

__all__ = ["estimate_image_stats", "combine_stats", "component_diameter"]


def _plane(image: np.ndarray) -> np.ndarray:
    planes, _ = split_planes(np.asarray(image))
    return planes[len(planes) // 2]


def component_diameter(plane: np.ndarray, *, min_diameter: float = 3.0) -> tuple[float, int, float]:
    """Median equivalent diameter of the compact bright objects of a plane.

    The plane is normalised and smoothed; objects are the connected components
    above Otsu's threshold. Compact objects (solidity > 0.9, mostly single
    nuclei) are preferred over irregular ones (touching clusters).

    Parameters
    ----------
    plane : ndarray of shape (M, N)
    min_diameter : float
        Objects smaller than a disk of this diameter are ignored (noise, debris).

    Returns
    -------
    diameter : float
        NaN when no object is found.
    n_objects : int
    foreground_fraction : float

    Examples
    --------
    >>> from skimage.draw import disk
    >>> img = np.zeros((96, 96), np.float32)
    >>> for r in (20, 60):
    ...     for c in (20, 60):
    ...         img[disk((r, c), 8)] = 1.0
    >>> d, n, f = component_diameter(img)
    >>> 15 < d < 18, n
    (True, 4)
    """
    from scipy.ndimage import gaussian_filter
    from skimage.filters import threshold_otsu
    from skimage.measure import label, regionprops

    x = gaussian_filter(normalize_image(np.asarray(plane)), 1.0)
    if np.ptp(x) <= 0:
        return float("nan"), 0, 0.0
    fg = x > threshold_otsu(x)
    props = [p for p in regionprops(label(fg)) if p.area >= np.pi * min_diameter ** 2 / 4]
    if not props:
        return float("nan"), 0, float(fg.mean())
    area = np.array([p.area for p in props], float)
    solid = np.array([p.solidity for p in props], float)
    pick = area[solid > 0.9] if (solid > 0.9).sum() >= 3 else area
    return float(2 * np.sqrt(np.median(pick) / np.pi)), len(props), float(fg.mean())


def estimate_image_stats(image: np.ndarray, *, diameter: Union[float, str] = "auto") -> dict:
    """Estimate the nucleus size and density of one unlabelled image.

    The diameter is :func:`~cellsynth.count.estimate_diameter`'s, the one
    ``count_cells(diameter="auto")`` uses, so an adapted counter's scale and the
    counting scale agree; the median equivalent diameter of compact bright
    objects (:func:`component_diameter`) stands in where it finds nothing. The
    count estimate is the classic counter's at that diameter.

    Parameters
    ----------
    image : ndarray
        2D image, multichannel image (max over channels) or stack (middle plane).
    diameter : float or "auto"
        A known diameter in pixels skips the size estimate.

    Returns
    -------
    dict
        ``diameter`` (px), ``diameter_objects`` and ``diameter_estimate`` (the
        two estimates, None when unavailable), ``count_estimate`` (cells),
        ``density`` (cells per 1e4 px^2), ``foreground_fraction``,
        ``n_objects``, ``shape``.

    Raises
    ------
    ValueError
        ``diameter`` is neither positive nor ``"auto"``, or no cell-like structure
        was found and no diameter was given.

    Examples
    --------
    >>> from skimage.draw import disk
    >>> img = np.zeros((128, 128), np.float32)
    >>> for r in range(16, 128, 32):
    ...     for c in range(16, 128, 32):
    ...         img[disk((r, c), 7)] = 1.0
    >>> s = estimate_image_stats(img)
    >>> 12 < s["diameter"] < 17, s["count_estimate"]
    (True, 16)
    """
    plane = _plane(image)
    d_obj, n_obj, fg = component_diameter(plane)
    try:
        d_est = float(estimate_diameter(plane))
    except ValueError:
        d_est = float("nan")
    if isinstance(diameter, str):
        if diameter != "auto":
            raise ValueError(f"diameter must be a positive number of pixels or 'auto', got {diameter!r}")
        if np.isfinite(d_est):
            d = d_est
        elif np.isfinite(d_obj):
            d = d_obj
        else:
            raise ValueError("could not estimate a cell diameter: no cell-like objects in the image; give diameter=")
    else:
        if not (np.isscalar(diameter) and np.isfinite(diameter) and diameter > 0):
            raise ValueError(f"diameter must be a positive number of pixels or 'auto', got {diameter!r}")
        d = float(diameter)
    pts, _ = classic_peaks(normalize_image(plane), ClassicParams(diameter=d))
    n = int(len(pts))
    return {
        "diameter": float(d),
        "diameter_objects": d_obj if np.isfinite(d_obj) else None,
        "diameter_estimate": d_est if np.isfinite(d_est) else None,
        "count_estimate": n,
        "density": float(n / plane.size * 1e4),
        "foreground_fraction": float(fg),
        "n_objects": int(n_obj),
        "shape": tuple(int(s) for s in plane.shape),
    }


def combine_stats(stats: Sequence[dict]) -> dict:
    """One summary of several images' stats: median diameter and density, mean foreground.

    Examples
    --------
    >>> combine_stats([{"diameter": 10.0, "density": 2.0, "foreground_fraction": 0.1},
    ...                {"diameter": 14.0, "density": 4.0, "foreground_fraction": 0.3}])["diameter"]
    12.0
    """
    if not stats:
        raise ValueError("need the stats of at least one image")
    return {
        "diameter": float(np.median([s["diameter"] for s in stats])),
        "density": float(np.median([s["density"] for s in stats])),
        "foreground_fraction": float(np.mean([s["foreground_fraction"] for s in stats])),
        "n_images": len(stats),
    }
