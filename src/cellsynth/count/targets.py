"""Training targets from cell centres: density maps, centre maps, CutMix with exact counts.

numpy/scipy only.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
from scipy.ndimage import gaussian_filter, gaussian_filter1d

__all__ = ["density_target", "centre_map", "count_in_box", "cutmix", "random_crop"]

RngLike = Union[np.random.Generator, int, None]


def _as_centres(centres) -> np.ndarray:
    c = np.asarray(centres, dtype=float)
    if c.size == 0:
        return np.zeros((0, 2))
    if c.ndim != 2 or c.shape[1] != 2:
        raise ValueError(f"centres must have shape (K, 2) as (row, col), got {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError("centres contain NaN or infinite values")
    return c


def _inside(c: np.ndarray, shape) -> np.ndarray:
    return (c[:, 0] >= 0) & (c[:, 0] < shape[0]) & (c[:, 1] >= 0) & (c[:, 1] < shape[1])


def density_target(centres, shape: tuple[int, int], *, sigma: float = 2.5, scale: float = 1.0) -> np.ndarray:
    """Gaussian density map whose mass is ``scale`` per cell centre inside the image.

    Each centre is split bilinearly over its 4 nearest pixels and blurred with a
    Gaussian of ``sigma`` pixels. Mass that would fall outside the image is put
    back by weighting each impulse by its in-image kernel mass, so the map sums
    to exactly ``scale * K`` for ``K`` centres inside the image (centres outside
    are ignored).

    Parameters
    ----------
    centres : array-like of shape (K, 2)
        Cell centres ``(row, col)`` in pixel coordinates (integer values address
        pixel centres, as in :func:`cellsynth.layouts.generate_layout`).
    shape : tuple of int
        ``(M, N)`` of the map.
    sigma : float
        Gaussian standard deviation in pixels.
    scale : float
        Mass per cell.

    Returns
    -------
    ndarray of shape (M, N), float32

    Examples
    --------
    >>> d = density_target([[0.0, 0.0], [5.2, 7.7], [20, 3]], (10, 12), sigma=2.0)
    >>> round(float(d.sum()), 4)  # the third centre is outside
    2.0
    >>> np.unravel_index(np.argmax(d), d.shape)[0] in (0, 5)
    True
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    c = _as_centres(centres)
    rows, cols = int(shape[0]), int(shape[1])
    c = c[_inside(c, (rows, cols))]
    impulses = np.zeros((rows, cols), np.float64)
    if len(c):
        # In-image mass of a kernel centred on each pixel, per axis.
        mr = gaussian_filter1d(np.ones(rows), sigma, mode="constant")
        mc = gaussian_filter1d(np.ones(cols), sigma, mode="constant")
        r0 = np.floor(c[:, 0]).astype(int)
        c0 = np.floor(c[:, 1]).astype(int)
        fr, fc = c[:, 0] - r0, c[:, 1] - c0
        for dr, wr in ((0, 1 - fr), (1, fr)):
            for dc, wc in ((0, 1 - fc), (1, fc)):
                rr = np.minimum(r0 + dr, rows - 1)
                cc = np.minimum(c0 + dc, cols - 1)
                np.add.at(impulses, (rr, cc), wr * wc / (mr[rr] * mc[cc]))
    out = gaussian_filter(impulses, sigma, mode="constant") * scale
    return out.astype(np.float32)


def centre_map(centres, shape: tuple[int, int]) -> np.ndarray:
    """Integer map counting the centres that fall in each pixel (``floor`` of the coordinates).

    Examples
    --------
    >>> centre_map([[0.5, 1.2], [0.9, 1.9], [3, 3]], (2, 3)).tolist()
    [[0, 2, 0], [0, 0, 0]]
    """
    c = _as_centres(centres)
    m = np.zeros(tuple(int(s) for s in shape), np.int32)
    c = c[_inside(c, m.shape)]
    np.add.at(m, (np.floor(c[:, 0]).astype(int), np.floor(c[:, 1]).astype(int)), 1)
    return m


def count_in_box(centres, box: tuple[int, int, int, int]) -> np.ndarray:
    """Boolean mask of the centres whose pixel lies in ``box = (row0, col0, row1, col1)`` (end exclusive)."""
    c = _as_centres(centres)
    r, k = np.floor(c[:, 0]), np.floor(c[:, 1])
    return (r >= box[0]) & (r < box[2]) & (k >= box[1]) & (k < box[3])


def cutmix(
    image_a: np.ndarray,
    centres_a,
    image_b: np.ndarray,
    centres_b,
    *,
    alpha: float = 1.0,
    p: float = 0.5,
    rng: RngLike = None,
) -> tuple[np.ndarray, np.ndarray, Optional[tuple[int, int, int, int]]]:
    """CutMix two images and recompute the cell centres exactly.

    With probability ``p`` a box whose area fraction is drawn from
    ``Beta(alpha, alpha)`` is pasted from ``image_b`` into ``image_a``; the same cut
    is applied to both sets of cell centres, so the mixed image keeps ``a``'s
    centres outside the box and ``b``'s centres inside it (a centre belongs to the
    pixel ``floor(row), floor(col)``).

    Parameters
    ----------
    image_a, image_b : ndarray of shape (M, N) or (M, N, C)
        Same shape.
    centres_a, centres_b : array-like of shape (K, 2)
    alpha : float
        Beta distribution parameter of the pasted area fraction.
    p : float
        Probability of mixing; otherwise ``a`` is returned unchanged.
    rng : numpy.random.Generator or int, optional

    Returns
    -------
    image : ndarray
        The mixed image (a copy).
    centres : ndarray of shape (K', 2)
    box : tuple of int or None
        ``(row0, col0, row1, col1)`` of the pasted region, None when not mixed.

    Examples
    --------
    >>> a, b = np.zeros((8, 8)), np.ones((8, 8))
    >>> img, cen, box = cutmix(a, [[1, 1]], b, [[6, 6], [2, 5]], p=1.0, rng=0)
    >>> ca, cb = centre_map([[1, 1]], (8, 8)), centre_map([[6, 6], [2, 5]], (8, 8))
    >>> mask = img.astype(bool)
    >>> len(cen) == int(ca[~mask].sum() + cb[mask].sum())
    True
    """
    if image_a.shape != image_b.shape:
        raise ValueError(f"cutmix needs images of the same shape, got {image_a.shape} and {image_b.shape}")
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if not 0 <= p <= 1:
        raise ValueError(f"p must be in [0, 1], got {p}")
    rng = np.random.default_rng(rng)
    ca, cb = _as_centres(centres_a), _as_centres(centres_b)
    if rng.random() >= p:
        return image_a.copy(), ca.copy(), None
    rows, cols = image_a.shape[:2]
    lam = rng.beta(alpha, alpha)
    h = int(round(rows * np.sqrt(lam)))
    w = int(round(cols * np.sqrt(lam)))
    r0 = int(rng.integers(0, rows - h + 1))
    c0 = int(rng.integers(0, cols - w + 1))
    box = (r0, c0, r0 + h, c0 + w)
    out = image_a.copy()
    out[r0:r0 + h, c0:c0 + w] = image_b[r0:r0 + h, c0:c0 + w]
    centres = np.concatenate([ca[~count_in_box(ca, box)], cb[count_in_box(cb, box)]], axis=0)
    return out, centres, box


def random_crop(image: np.ndarray, target: np.ndarray, size: int, *, rng: RngLike = None):
    """The same random ``size x size`` crop of an image and its density map, plus a random flip/rot90."""
    rng = np.random.default_rng(rng)
    rows, cols = image.shape[:2]
    if rows < size or cols < size:
        pad = ((0, max(0, size - rows)), (0, max(0, size - cols)))
        image = np.pad(image, pad + ((0, 0),) * (image.ndim - 2), mode="constant")
        target = np.pad(target, pad, mode="constant")
        rows, cols = image.shape[:2]
    r0 = int(rng.integers(0, rows - size + 1))
    c0 = int(rng.integers(0, cols - size + 1))
    img = image[r0:r0 + size, c0:c0 + size]
    tgt = target[r0:r0 + size, c0:c0 + size]
    k = int(rng.integers(0, 4))
    img, tgt = np.rot90(img, k), np.rot90(tgt, k)
    if rng.random() < 0.5:
        img, tgt = img[:, ::-1], tgt[:, ::-1]
    return np.ascontiguousarray(img), np.ascontiguousarray(tgt)
