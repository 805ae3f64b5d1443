"""Neural spectral clustering (NSC) masks (DiffStain section 2.2).

The image is cut into fields of view (FOVs). Each FOV is resized to the backbone's
input size and described by a grid of patch features. One FOV, the *anchor*, is
shared: every FOV is embedded jointly with it through the augmented affinity

    A~ = [[A_a, A_as], [A_as^T, A_s]],   A~_ij = max(cos(F_i, F_j), 0),

the normalised Laplacian ``L = I - D^-1/2 A~ D^-1/2`` gives a spectral embedding
from its first ``r`` non-trivial eigenvectors (the largest eigenvalues of
``D^-1/2 A~ D^-1/2``, from scipy's sparse solver ``eigsh``; never a dense
decomposition), and k-means splits the embedding into ``k`` clusters. A cluster
``u`` of FOV ``i`` takes the label ``v`` of the reference clustering that it
overlaps most on the anchor part (the paper's label mapping ``theta``), so the
same structure gets the same label in every FOV. Patch labels are brought to
pixel resolution by bilinear interpolation of the one-hot cluster maps, and
clusters are numbered by mean intensity (1 = darkest). Where patch labels
meet, each pixel takes the neighbouring cluster whose mean intensity is
closest to its own (``refine_boundaries``), which gives pixel-accurate edges. The foreground is
(``"auto"``) the brighter of the two groups of clusters that Otsu's criterion
separates (between-class variance of the cluster means, weighted by their pixel
counts, :func:`otsu_split`), with its edges placed at pixel accuracy within one
patch of the clusters' boundary (``refine_boundaries``; the role DenseCRF plays
in the public code); or the brightest cluster; or every label (``"all"``).

The spectral embedding is clustered as it is (no row normalisation). With
``r`` much larger than ``k - 1`` the extra eigenvectors mostly carry noise; the
paper's setting is ``r = k = 5``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..progress import ProgressCallback, report
from .params import NSCParams

__all__ = [
    "NSCResult",
    "cosine_affinity",
    "spectral_embedding",
    "synchronise_labels",
    "normalise_intensity",
    "nsc_masks",
    "nsc_channels",
    "otsu_split",
]


@dataclass(frozen=True)
class NSCResult:
    """NSC output for one image.

    Attributes
    ----------
    labels : ndarray of shape (M, N), uint8
        Cluster labels 1..k, numbered by increasing mean intensity.
    foreground : ndarray of shape (M, N), bool
        Foreground pixels, chosen as ``params.foreground`` says (for ``"all"``:
        every cluster but the darkest).
    cluster_means : ndarray of shape (k,)
        Mean normalised intensity of each label (NaN for a label with no pixel).
    backbone : str
        Name of the backbone that produced the features.
    params : NSCParams
    """

    labels: np.ndarray
    foreground: np.ndarray
    cluster_means: np.ndarray
    backbone: str
    params: NSCParams = field(repr=False)

    @property
    def mask(self) -> np.ndarray:
        """What ``params.foreground`` asks for: the label image for ``"all"``, else a 0/1 uint8 mask."""
        if self.params.foreground == "all":
            return self.labels
        return self.foreground.astype(np.uint8)


def normalise_intensity(image: np.ndarray, *, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """Clip to the ``low``-``high`` percentiles and scale to [0, 1] (float32).

    Examples
    --------
    >>> x = normalise_intensity(np.arange(100.0).reshape(10, 10), low=0, high=100)
    >>> float(x.min()), float(x.max())
    (0.0, 1.0)
    """
    img = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(img, [low, high])
    if not hi > lo:
        return np.zeros_like(img)
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0)


def cosine_affinity(features: np.ndarray) -> np.ndarray:
    """Cosine similarity of feature rows with negative values set to zero.

    Parameters
    ----------
    features : ndarray of shape (n, C)

    Returns
    -------
    ndarray of shape (n, n), float64

    Examples
    --------
    >>> cosine_affinity(np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    array([[1., 0., 0.],
           [0., 1., 0.],
           [0., 0., 1.]])
    """
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must have shape (n, C), got {f.shape}")
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    f = f / np.maximum(norms, 1e-12)
    a = f @ f.T
    np.maximum(a, 0.0, out=a)
    return a


def spectral_embedding(affinity: np.ndarray, r: int, *, seed: int = 0, solver: str = "sparse"
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The first ``r`` non-trivial eigenpairs of the normalised Laplacian.

    ``L = I - D^-1/2 A D^-1/2``; its smallest eigenvalues are one minus the largest
    of the normalised affinity, which scipy's Lanczos solver ``eigsh`` finds
    without a full decomposition. ``solver="dense"`` uses ``scipy.linalg.eigh``
    (for checks and benchmarks only).

    Parameters
    ----------
    affinity : ndarray of shape (n, n)
        Symmetric, non-negative.
    r : int
        Number of non-trivial eigenvectors.
    seed : int
        Seed of the solver's start vector (makes the result reproducible).
    solver : {"sparse", "dense"}

    Returns
    -------
    eigenvalues : ndarray of shape (r,)
        Laplacian eigenvalues, increasing.
    vectors : ndarray of shape (n, r)
        Eigenvectors of the normalised affinity (unit columns, sign fixed so that
        the largest-magnitude entry is positive).

    Examples
    --------
    >>> a = np.kron(np.eye(2), np.ones((3, 3)))  # two disconnected triangles
    >>> vals, vecs = spectral_embedding(a + 1e-3, 1)
    >>> bool(vals[0] < 0.01), bool(np.sign(vecs[0, 0]) != np.sign(vecs[3, 0]))
    (True, True)
    """
    a = np.asarray(affinity, dtype=np.float64)
    n = a.shape[0]
    if a.ndim != 2 or a.shape[1] != n:
        raise ValueError(f"affinity must be a square matrix, got shape {a.shape}")
    if not 1 <= r < n - 1:
        raise ValueError(f"r must be in [1, {n - 2}] for {n} nodes, got {r}")
    d = a.sum(axis=1)
    s = 1.0 / np.sqrt(np.maximum(d, 1e-12))
    if solver == "sparse":
        from scipy.sparse.linalg import LinearOperator, eigsh

        # D^-1/2 A D^-1/2 as an operator: products only, no scaled copy of A
        m = LinearOperator((n, n), matvec=lambda x: s * (a @ (s * np.ravel(x))), dtype=np.float64)
        v0 = np.random.default_rng(seed).random(n) + 0.5
        vals, vecs = eigsh(m, k=r + 1, which="LA", v0=v0, tol=1e-8)
    elif solver == "dense":
        from scipy.linalg import eigh

        vals, vecs = eigh(a * s[:, None] * s[None, :], subset_by_index=[n - r - 1, n - 1])
    else:
        raise ValueError(f"solver must be 'sparse' or 'dense', got {solver!r}")
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order][1:], vecs[:, order][:, 1:]
    idx = np.argmax(np.abs(vecs), axis=0)
    vecs = vecs * np.sign(vecs[idx, np.arange(vecs.shape[1])])
    return 1.0 - vals, vecs


def synchronise_labels(labels: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """The paper's label map theta: cluster ``u`` -> the reference label it overlaps most.

    Parameters
    ----------
    labels, reference : ndarray of shape (n,), int
        Two clusterings of the same (anchor) nodes, labels in ``[0, k)``.

    Returns
    -------
    ndarray of shape (k,), int
        ``mapping[u]``; ``-1`` for a cluster that has no node here.

    Examples
    --------
    >>> synchronise_labels(np.array([0, 0, 1, 2]), np.array([2, 2, 0, 1]), 3)
    array([2, 0, 1])
    """
    labels = np.asarray(labels, dtype=np.int64)
    reference = np.asarray(reference, dtype=np.int64)
    overlap = np.zeros((k, k), dtype=np.int64)
    np.add.at(overlap, (labels, reference), 1)
    mapping = overlap.argmax(axis=1)
    mapping[overlap.sum(axis=1) == 0] = -1
    return mapping


def _fovs(img: np.ndarray, fov: int) -> tuple[np.ndarray, list, tuple]:
    """Reflect-pad to multiples of ``fov``; return padded image, FOV origins and padded shape."""
    m, n = img.shape
    pm, pn = -m % fov, -n % fov
    mode = "reflect" if pm < m and pn < n else "symmetric"
    padded = np.pad(img, ((0, pm), (0, pn)), mode=mode) if (pm or pn) else img
    origins = [(r, c) for r in range(0, padded.shape[0], fov) for c in range(0, padded.shape[1], fov)]
    return padded, origins, padded.shape


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    from skimage.transform import resize

    if img.shape == (size, size):
        return img.astype(np.float32, copy=False)
    return resize(img, (size, size), order=1, anti_aliasing=img.shape[0] > size, preserve_range=True).astype(np.float32)


def _features(backbone, fovs: list, grid: int, batch: int = 8) -> np.ndarray:
    out = [backbone.features(np.stack(fovs[i:i + batch]), grid) for i in range(0, len(fovs), batch)]
    return np.concatenate(out).reshape(len(fovs), grid * grid, -1).astype(np.float64)


def _cluster_joint(fa: np.ndarray, fs: np.ndarray, params: NSCParams) -> np.ndarray:
    """Joint spectral clustering of anchor and FOV patch features; k-means labels of all 2n nodes."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    a = cosine_affinity(np.concatenate([fa, fs]))
    _, vecs = spectral_embedding(a, params.r, seed=params.seed)
    with threadpool_limits(limits=1, user_api="openmp"):  # tiny problem: threads only add overhead
        km = KMeans(n_clusters=params.k, n_init=params.n_init, random_state=params.seed).fit(vecs)
    return km.labels_.astype(np.int64)


def _refine(raw: np.ndarray, votes: np.ndarray, norm: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Pixel-resolution boundaries: where several clusters' patch votes meet, each pixel
    takes the candidate cluster whose mean intensity is closest to its own (smoothed)."""
    from scipy import ndimage as ndi

    smooth = ndi.gaussian_filter(norm, 1.0)
    candidates = votes > 0.02
    mixed = candidates.sum(axis=0) > 1
    if not np.any(mixed):
        return raw
    cost = np.abs(smooth[None] - np.nan_to_num(means, nan=np.inf)[:, None, None])
    cost = np.where(candidates, cost, np.inf)
    out = raw.copy()
    out[mixed] = cost[:, mixed].argmin(axis=0)
    return out


def otsu_split(means: np.ndarray, sizes: np.ndarray) -> tuple[int, float]:
    """Split clusters sorted by mean intensity into background and foreground by Otsu's criterion.

    The cut maximises the between-class variance ``w0 w1 (mu0 - mu1)^2`` of the two
    groups (weights: pixel counts), as Otsu's threshold does for grey levels.

    Parameters
    ----------
    means : ndarray of shape (k,)
        Cluster mean intensities, increasing.
    sizes : ndarray of shape (k,)
        Pixels per cluster.

    Returns
    -------
    cut : int
        Clusters ``cut..k-1`` (0-based) are foreground.
    threshold : float
        The intensity halfway between the two groups' means.

    Examples
    --------
    >>> otsu_split(np.array([0.0, 0.1, 0.6, 0.9]), np.array([900, 50, 30, 20]))
    (2, 0.362...)
    """
    m, w = np.asarray(means, float), np.asarray(sizes, float)
    if len(m) < 2:
        return 0, float(m[0]) if len(m) else 0.0
    best, cut, threshold = -1.0, len(m) - 1, float(m[-1])
    for j in range(1, len(m)):
        w0, w1 = w[:j].sum(), w[j:].sum()
        if w0 <= 0 or w1 <= 0:
            continue
        mu0, mu1 = (w[:j] * m[:j]).sum() / w0, (w[j:] * m[j:]).sum() / w1
        between = w0 * w1 * (mu1 - mu0) ** 2
        if between > best:
            best, cut, threshold = between, j, float((mu0 + mu1) / 2)
    return cut, threshold


def _refine_foreground(foreground: np.ndarray, norm: np.ndarray, threshold: float, band: int) -> np.ndarray:
    """Pixel-accurate foreground edges: within ``band`` pixels (one patch) of the clusters'
    foreground boundary, a pixel is foreground when its smoothed intensity exceeds the threshold
    between the two groups of clusters; elsewhere the clusters decide."""
    from scipy import ndimage as ndi

    near = ndi.binary_dilation(foreground, iterations=band) & ~ndi.binary_erosion(foreground, iterations=band)
    out = foreground.copy()
    out[near] = ndi.gaussian_filter(norm, 1.0)[near] > threshold
    return out


def otsu_foreground(image: np.ndarray) -> np.ndarray:
    """The plain answer for a nuclear stain: pixels above Otsu's threshold of the image.

    The 'auto' foreground is the clusters' foreground together with these pixels:
    the clusters add what one global threshold misses (dim nuclei that form a
    cluster of their own, pixel-refined edges) and never lose what it finds. On the
    development images (disks of the annotated diameter at the annotated centres as
    truth, ``benchmarks/bench_nsc_real.py``) the foreground's IoU is at least Otsu's
    on all 11: neurons 0.533 against 0.528, stem cells 0.401 against 0.329 (the
    clusters alone: worse than Otsu on 4 of the 6 stem-cell frames, whose dim nuclei
    share the background's cluster).
    """
    from skimage.filters import threshold_otsu

    img = np.asarray(image, np.float64)
    if float(img.max()) <= float(img.min()):
        return np.zeros(img.shape, bool)
    return img > threshold_otsu(img)


#: Bytes per pixel of nsc_masks' peak: votes, refinement costs and label maps (``a * k + b``); measured
#: at 180 bytes per pixel for k = 5 on an 8000 x 8000 image.
_BYTES_PER_PIXEL = (24, 64)


def _check_memory(shape: tuple, params: NSCParams) -> None:
    from ..io import require_memory

    m, n = shape
    pixels = (m + -m % params.fov) * (n + -n % params.fov)
    a, b = _BYTES_PER_PIXEL
    require_memory(pixels * (a * params.k + b), what=f"NSC of a {m} x {n} image with k={params.k}",
                   hint="crop or downsample the image, or use a smaller k")


def _empty_result(shape: tuple, params: NSCParams, backbone) -> NSCResult:
    """The result for an image without structure: one label, no foreground."""
    means = np.full(params.k, np.nan)
    means[0] = 0.0
    return NSCResult(labels=np.ones(shape, np.uint8), foreground=np.zeros(shape, bool), cluster_means=means,
                     backbone=getattr(backbone, "name", type(backbone).__name__), params=params)


def nsc_masks(
    image: np.ndarray,
    *,
    params: Optional[NSCParams] = None,
    backbone=None,
    anchor: Optional[np.ndarray] = None,
    progress: Optional[ProgressCallback] = None,
    _stage: tuple = ("nsc", 0, None),
) -> NSCResult:
    """NSC structure masks of one 2-D image.

    Parameters
    ----------
    image : ndarray of shape (M, N)
        Any real dtype; normalised to [0, 1] by the 1-99.8 percentiles.
    params : NSCParams, optional
    backbone : Backbone, optional
        A ready backbone; by default built from ``params.backbone`` (the filter
        bank needs no weights; DINO models are resolved through ``cellsynth.weights``).
    anchor : ndarray of shape (P, Q), optional
        The shared anchor image, resized to the backbone input like a field of
        view (so give it at the scale of one, about ``params.fov`` pixels). By
        default the FOV of this image with the widest intensity spread.
    progress : ProgressCallback, optional
        One event per field of view (stage ``"nsc"``); may raise Cancelled.

    Returns
    -------
    NSCResult

    An image without structure (constant between its 1st and 99.8th
    percentiles, e.g. all zero) gets one label and no foreground.

    Raises
    ------
    ValueError
        If the image is not 2-D, is empty, holds non-finite values, or would
        need more memory than is free (estimated before any work).

    Examples
    --------
    >>> img = np.zeros((64, 64)); img[16:48, 16:48] = 1.0
    >>> res = nsc_masks(img, params=NSCParams(k=2, r=2, fov=64, input_size=64, patch=4))
    >>> res.labels.shape, bool(res.foreground[32, 32]), bool(res.foreground[2, 2])
    ((64, 64), True, False)
    """
    params = params or NSCParams()
    if not isinstance(params, NSCParams):
        raise TypeError(f"params must be an NSCParams, got {type(params).__name__}")
    img = np.asarray(image)
    if img.ndim != 2 or img.size == 0:
        raise ValueError(f"image must be a non-empty 2-D array (M, N), got shape {img.shape}")
    if not np.issubdtype(img.dtype, np.number) or np.iscomplexobj(img):
        raise TypeError(f"image must hold real numbers, got dtype {img.dtype}")
    if not np.all(np.isfinite(img)):
        raise ValueError("image holds NaN or infinite values")
    _check_memory(img.shape, params)
    if backbone is None:
        from .features import make_backbone

        backbone = make_backbone(params.backbone)
    stage, done, total = _stage
    norm = normalise_intensity(img)
    padded, origins, pshape = _fovs(norm, params.fov)
    total = total if total is not None else len(origins)
    if not norm.any():  # constant (e.g. all zero) between the percentiles: no structure to find
        report(progress, stage, done + len(origins), total, "no structure")
        return _empty_result(img.shape, params, backbone)
    g, size, k = params.grid, params.input_size, params.k
    fov_imgs = [_resize(padded[r:r + params.fov, c:c + params.fov], size) for r, c in origins]
    feats = _features(backbone, fov_imgs, g)
    if anchor is None:
        spread = [np.percentile(f, 95) - np.percentile(f, 5) for f in fov_imgs]
        fa = feats[int(np.argmax(spread))]
    else:
        anchor = np.asarray(anchor)
        if anchor.ndim != 2 or anchor.size == 0:
            raise ValueError(f"anchor must be a non-empty 2-D array, got shape {anchor.shape}")
        fa = _features(backbone, [_resize(normalise_intensity(anchor), size)], g)[0]
    n = g * g
    reference = None
    votes = np.zeros((k,) + pshape, dtype=np.float32)
    for i, (r, c) in enumerate(origins):
        joint = _cluster_joint(fa, feats[i], params)
        if reference is None:
            reference = joint[:n]
        mapping = synchronise_labels(joint[:n], reference, k)
        if np.any(mapping < 0):  # clusters absent from the anchor: nearest reference centroid
            fs = feats[i]
            ref_means = np.stack([fa[reference == v].mean(axis=0) if np.any(reference == v) else
                                  np.full(fa.shape[1], np.inf) for v in range(k)])
            for u in np.flatnonzero(mapping < 0):
                members = joint[n:] == u
                if np.any(members):
                    mapping[u] = int(np.argmin(((ref_means - fs[members].mean(axis=0)) ** 2).sum(axis=1)))
                else:
                    mapping[u] = 0
        patch = mapping[joint[n:]].reshape(g, g)
        onehot = (patch[None] == np.arange(k)[:, None, None]).astype(np.float32)
        votes[:, r:r + params.fov, c:c + params.fov] = np.stack([_resize(o, params.fov) for o in onehot])
        report(progress, stage, done + i + 1, total, f"field of view {i + 1}/{len(origins)}")
    votes = votes[:, : img.shape[0], : img.shape[1]]
    raw = votes.argmax(axis=0)
    means = np.array([norm[raw == v].mean() if np.any(raw == v) else np.nan for v in range(k)])
    if params.refine_boundaries:
        raw = _refine(raw, votes, norm, means)
        means = np.array([norm[raw == v].mean() if np.any(raw == v) else np.nan for v in range(k)])
    order = np.argsort(np.where(np.isnan(means), np.inf, means), kind="stable")
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(k)
    labels = (rank[raw] + 1).astype(np.uint8)
    sorted_means = means[order]
    present = sorted_means[~np.isnan(sorted_means)]
    if params.foreground == "brightest":
        fg_labels = [len(present)]
    elif params.foreground == "auto":
        sizes = np.bincount(labels.ravel(), minlength=k + 1)[1:len(present) + 1]
        cut, threshold = otsu_split(present, sizes)
        fg_labels = list(range(cut + 1, len(present) + 1))
    else:
        fg_labels = list(range(2, k + 1))
    foreground = np.isin(labels, fg_labels)
    if params.foreground == "auto" and params.refine_boundaries and len(present) > 1:
        foreground = _refine_foreground(foreground, norm, threshold, band=-(-params.fov // params.grid))
    if params.foreground == "auto":
        foreground |= otsu_foreground(img)
    return NSCResult(labels=labels, foreground=foreground, cluster_means=sorted_means,
                     backbone=getattr(backbone, "name", type(backbone).__name__), params=params)


def nsc_channels(
    stack: np.ndarray,
    *,
    params: Optional[NSCParams] = None,
    backbone=None,
    progress: Optional[ProgressCallback] = None,
) -> list[NSCResult]:
    """NSC masks of each channel of a (C, M, N) stack, sharing one backbone.

    Progress counts fields of view over all channels (stage ``"nsc"``).

    Examples
    --------
    >>> stack = np.zeros((2, 32, 32)); stack[0, 8:24, 8:24] = 1; stack[1, :, 16:] = 1
    >>> res = nsc_channels(stack, params=NSCParams(k=2, r=1, fov=32, input_size=32, patch=4))
    >>> [bool(r.foreground[16, 20]) for r in res], [bool(r.foreground[2, 2]) for r in res]
    ([True, True], [False, False])
    """
    params = params or NSCParams()
    arr = np.asarray(stack)
    if arr.ndim != 3:
        raise ValueError(f"stack must have shape (C, M, N), got {arr.shape}")
    if backbone is None:
        from .features import make_backbone

        backbone = make_backbone(params.backbone)
    per = len(_fovs(np.zeros(arr.shape[1:], np.float32), params.fov)[1])
    out = []
    for ch in range(arr.shape[0]):
        out.append(nsc_masks(arr[ch], params=params, backbone=backbone,
                             _stage=("nsc", ch * per, per * arr.shape[0]), progress=progress))
    return out
