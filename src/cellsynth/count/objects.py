"""Reconciling a density counter's peaks with the image's foreground objects.

A density network sees texture: a large, elongated or speckled nucleus can give
two peaks, and a bright halo a peak of its own. The foreground of a nuclear stain
separates nuclei well wherever they do not touch. :func:`reconcile_with_objects`
lets each tool decide what it is good at: a foreground object about the size of
one nucleus is one cell (at its intensity centroid), whatever the number of peaks
in it; an object large enough to hold several nuclei keeps the network's peaks
(it splits touching nuclei); confident peaks outside the foreground (dim nuclei
below the threshold) are kept. numpy/scipy only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["ObjectParams", "PlaneObjects", "plane_objects", "reconcile_with_objects", "point_areas",
           "nucleus_areas"]


@dataclass(frozen=True)
class ObjectParams:
    """Parameters of :func:`reconcile_with_objects` (lengths and areas relative to the diameter).

    Parameters
    ----------
    split_area : float
        An object whose area is at least this multiple of a nucleus' area
        (a disk of the diameter) keeps the network's peaks when it holds two or more.
    keep_outside : float
        Peaks outside the foreground are kept when their score is at least this.
    outline_sigma : float
        Gaussian smoothing of the mask image as a fraction of the diameter.
    min_area : float
        Objects smaller than this fraction of a nucleus' area without a peak are debris.

    Examples
    --------
    >>> ObjectParams().split_area
    1.6
    >>> ObjectParams(split_area=0.5)
    Traceback (most recent call last):
    ...
    ValueError: split_area must be a number >= 1, got 0.5
    """

    split_area: float = 1.6
    keep_outside: float = 0.4
    outline_sigma: float = 0.08
    min_area: float = 0.15

    def __post_init__(self) -> None:
        if not (np.isfinite(self.split_area) and self.split_area >= 1):
            raise ValueError(f"split_area must be a number >= 1, got {self.split_area!r}")
        for name in ("keep_outside", "outline_sigma", "min_area"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def reconcile_with_objects(
    plane: np.ndarray,
    points: np.ndarray,
    scores: np.ndarray,
    density: np.ndarray,
    *,
    diameter: float,
    params: ObjectParams | None = None,
    threshold: float | None = None,
    objects: PlaneObjects | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One point per nucleus-sized foreground object, the network's peaks in larger ones.

    Parameters
    ----------
    plane : ndarray of shape (M, N)
        The normalised image (see :func:`~cellsynth.count.preprocess.normalize_image`).
    points : ndarray of shape (K, 2)
        The network's peaks ``(row, col)`` in ``plane``'s pixels.
    scores : ndarray of shape (K,)
        Their scores (peak height relative to a lone cell's).
    density : ndarray of shape (M, N)
        The density map (cells per pixel) in ``plane``'s pixels.
    diameter : float
        Nucleus diameter in ``plane``'s pixels.
    params : ObjectParams, optional
    threshold : float, optional
        Foreground threshold of the smoothed plane when computed elsewhere (e.g.
        once over a large image counted in tiles); by default Otsu's of ``plane``.
    objects : PlaneObjects, optional
        The plane's objects computed before (:func:`plane_objects` with the same
        diameter, params and threshold), e.g. once for many reconciliations.

    Returns
    -------
    points : ndarray of shape (K', 2)
    scores : ndarray of shape (K',)
        A peak keeps its score; an object's centroid gets the best score of the
        peaks inside it, or the density mass of the object when it holds none.

    Examples
    --------
    >>> from skimage.draw import ellipse
    >>> img = np.zeros((60, 80), np.float32)
    >>> img[ellipse(30, 40, 5, 11)] = 1.0  # one elongated nucleus
    >>> peaks = np.array([[30.0, 34.0], [30.0, 46.0]])  # two peaks on it
    >>> pts, sc = reconcile_with_objects(img, peaks, np.array([0.9, 0.8]), img / img.sum(), diameter=14)
    >>> np.round(pts).tolist(), sc.tolist()
    ([[30.0, 40.0]], [0.9])
    """
    params = params or ObjectParams()
    if not (np.isfinite(diameter) and diameter > 0):
        raise ValueError(f"diameter must be a positive number of pixels, got {diameter!r}")
    points = np.asarray(points, float).reshape(-1, 2)
    scores = np.asarray(scores, float).reshape(-1)
    objs = plane_objects(plane, diameter=diameter, params=params, threshold=threshold) if objects is None else objects
    if objs.k == 0:
        keep = scores >= params.keep_outside
        return points[keep], scores[keep]
    k, labels, areas = objs.k, objs.labels, objs.areas
    idx = np.clip(np.round(points).astype(int), 0, np.array(labels.shape) - 1)
    owner = labels[idx[:, 0], idx[:, 1]] if len(points) else np.zeros(0, int)
    n_peaks = np.bincount(owner, minlength=k + 1)[1:]
    best = np.zeros(k + 1)
    np.maximum.at(best, owner, scores)
    nucleus = np.pi * diameter * diameter / 4.0
    split = (n_peaks >= 2) & (areas >= params.split_area * nucleus)
    single = ~split & (areas >= params.min_area * nucleus)
    outside = (owner == 0) & (scores >= params.keep_outside)
    in_split = (owner > 0) & split[np.maximum(owner, 1) - 1]
    mass = np.bincount(objs.flat, weights=np.asarray(density).ravel()[objs.fg].astype(np.float64),
                       minlength=k + 1)[1:]
    single_scores = np.where(n_peaks > 0, best[1:], mass)
    out_pts = np.concatenate([points[outside | in_split], objs.centroids[single]], axis=0)
    out_scores = np.concatenate([scores[outside | in_split], single_scores[single]])
    return out_pts, out_scores.astype(float)


@dataclass(frozen=True)
class PlaneObjects:
    """The foreground objects of a plane (:func:`plane_objects`), computed once for any number of reconciliations.

    ``labels`` (M, N) int, ``k`` objects, ``areas`` (k,), ``centroids`` (k, 2)
    intensity-weighted, ``fg`` the flat indices of the foreground pixels and
    ``flat`` their labels.
    """

    labels: np.ndarray
    k: int
    areas: np.ndarray
    centroids: np.ndarray
    fg: np.ndarray
    flat: np.ndarray


def plane_objects(plane: np.ndarray, *, diameter: float, params: ObjectParams | None = None,
                  threshold: float | None = None) -> PlaneObjects:
    """The foreground objects :func:`reconcile_with_objects` reconciles peaks with (smoothing, threshold, labels).

    They depend on the plane, the diameter, ``params.outline_sigma`` and the
    threshold only: settings fitted over the other parameters share them.
    """
    from scipy.ndimage import gaussian_filter, label

    from .classic import foreground_threshold

    params = params or ObjectParams()
    if not (np.isfinite(diameter) and diameter > 0):
        raise ValueError(f"diameter must be a positive number of pixels, got {diameter!r}")
    plane = np.asarray(plane, np.float32)
    sigma = max(0.5, params.outline_sigma * diameter)
    smooth = gaussian_filter(plane, sigma)
    thr = foreground_threshold(plane, smooth, sigma=sigma) if threshold is None else float(threshold)
    labels, k = label(smooth > thr)
    # every per-object sum runs over the foreground pixels only (label 0 is never used)
    fg = np.flatnonzero(labels)
    flat = labels.ravel()[fg]
    areas = np.bincount(flat, minlength=k + 1)[1:]
    # intensity-weighted centroids (scipy's center_of_mass, by bincount: ~10x faster on large images)
    w = np.clip(plane.ravel()[fg], 0, None).astype(np.float64) + 1e-6
    rows, cols = np.divmod(fg, plane.shape[1])
    wsum = np.maximum(np.bincount(flat, weights=w, minlength=k + 1)[1:], 1e-300)
    centroids = np.stack([np.bincount(flat, weights=w * rows, minlength=k + 1)[1:] / wsum,
                          np.bincount(flat, weights=w * cols, minlength=k + 1)[1:] / wsum], axis=1) if k else \
        np.zeros((0, 2))
    return PlaneObjects(labels=labels, k=int(k), areas=areas, centroids=centroids, fg=fg, flat=flat)


def point_areas(plane: np.ndarray, points: np.ndarray, *, diameter: float,
                params: ObjectParams | None = None) -> np.ndarray:
    """The area in pixels of each point's nucleus: the pixels of the foreground object holding the point
    (:func:`plane_objects` of the normalised plane) that are nearer to it than to the object's other points.

    A point outside every object (a dim nucleus below the threshold) gets NaN: it has no object to measure.

    Examples
    --------
    >>> from skimage.draw import disk
    >>> img = np.zeros((40, 60), np.float32)
    >>> img[disk((20, 15), 6)] = 1.0
    >>> img[15:26, 35:56] = 1.0  # two touching nuclei: one object, shared out between its points
    >>> point_areas(img, np.array([[20.0, 15.0], [20.0, 40.0], [20.0, 50.0], [5.0, 5.0]]), diameter=12).tolist()
    [109.0, 121.0, 110.0, nan]
    """
    from scipy.spatial import cKDTree

    from .preprocess import normalize_image

    p = np.asarray(points, float).reshape(-1, 2)
    out = np.full(len(p), np.nan)
    if not len(p):
        return out
    obj = plane_objects(normalize_image(np.asarray(plane, np.float32)), diameter=diameter, params=params)
    rc = np.clip(np.round(p).astype(int), 0, np.array(obj.labels.shape) - 1)
    own = obj.labels[rc[:, 0], rc[:, 1]]
    held = np.bincount(own[own > 0], minlength=obj.k + 1)
    alone = (own > 0) & (held[own] == 1)
    out[alone] = obj.areas[own[alone] - 1]
    rows, cols = np.divmod(obj.fg, obj.labels.shape[1])
    for lab in np.flatnonzero(held > 1):  # an object holding several points: each pixel to the nearest one
        mine = np.flatnonzero(own == lab)
        pix = obj.flat == lab
        _, nearest = cKDTree(p[mine]).query(np.stack([rows[pix], cols[pix]], axis=1))
        out[mine] = np.bincount(nearest, minlength=len(mine))
    return out


def nucleus_areas(image: np.ndarray, points: np.ndarray, *, diameter: float, channel=None,
                  channel_axis=None) -> np.ndarray:
    """:func:`point_areas` of a counted image (any shape ``count_cells`` takes): points ``(K, 2 + S)`` carry
    their stack position first, as ``CountResult.points`` does; each plane is measured on its own."""
    from .preprocess import split_planes

    planes, lead = split_planes(np.asarray(image), channel=channel, channel_axis=channel_axis)
    p = np.asarray(points, float)
    p = p.reshape(-1, 2 + len(lead)) if p.size else np.zeros((0, 2 + len(lead)))
    if not lead:
        return point_areas(planes[0], p, diameter=diameter)
    index = np.ravel_multi_index(tuple(np.round(p[:, :len(lead)]).astype(int).T), lead) if len(p) else \
        np.zeros(0, int)
    out = np.full(len(p), np.nan)
    for k in np.unique(index):
        at = index == k
        out[at] = point_areas(planes[k], p[at, len(lead):], diameter=diameter)
    return out
