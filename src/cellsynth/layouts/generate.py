"""Syn-HC synthetic cell layouts (InST-Microscopy, Algorithm 1).

Cells are rotated ellipses grouped around 3-7 cluster centres. A new cell may
overlap the cells placed before it by at most ``max_overlap`` of its own area, and
its centre pixel must be free. Otherwise it is re-drawn, and dropped after
``max_tries`` attempts, so the true count is what was placed. Pixels shared by
two cells belong to the earlier one, so every centre lies inside its own label.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from .params import LayoutParams

__all__ = ["Layout", "Appearance", "generate_layout", "render_layout", "ellipse_mask", "requested_count",
           "CELL_COLUMNS"]

#: Columns of the per-cell table, in order.
CELL_COLUMNS = ("label", "row", "col", "radius_row", "radius_col", "angle", "intensity")

RngLike = Union[np.random.Generator, int, None]


@dataclass(frozen=True)
class Appearance:
    """The random draws that give a layout its look, kept so that edited cells keep it.

    Attributes
    ----------
    background, contrast, brightness : float
        Uniform draws in [0, 1): where in the ranges of ``LayoutParams.background``,
        ``contrast`` and ``brightness`` this layout's values lie.
    noise : ndarray of shape (M, N), float32, or None
        The standard-normal noise field (scaled by ``noise_std``); None when it was 0.
    """

    background: float
    noise: Optional[np.ndarray]
    contrast: float
    brightness: float

    def fits(self, params: LayoutParams) -> bool:
        """Whether these draws can render an image of ``params`` (same shape; noise drawn if it is needed)."""
        if params.noise_std > 0:
            return self.noise is not None and self.noise.shape == tuple(params.shape)
        return True


@dataclass(frozen=True)
class Layout:
    """A generated or rendered layout.

    Attributes
    ----------
    image : ndarray of shape (M, N), uint8
        The synthetic fluorescence image.
    labels : ndarray of shape (M, N), uint16
        Instance labels; cell ``k`` of the table has label ``k + 1``.
    centres : ndarray of shape (K, 2), float
        Cell centres ``(row, col)``.
    cells : dict of str to ndarray
        Per-cell table with the columns :data:`CELL_COLUMNS`: the label, the centre,
        the semi-axes ``radius_row``/``radius_col`` before rotation and ``angle``
        (radians, see :func:`ellipse_mask`), and ``intensity``.
    appearance : Appearance, optional
        Background, noise, contrast and brightness draws; ``render_layout(...,
        appearance=layout.appearance)`` renders edited cells with the same look.
    """

    image: np.ndarray
    labels: np.ndarray
    centres: np.ndarray
    cells: dict
    appearance: Optional[Appearance] = None

    @property
    def n_cells(self) -> int:
        """Number of cells placed (the true count)."""
        return int(self.centres.shape[0])


def _empty_table() -> dict:
    return {c: np.zeros(0, dtype=np.uint16 if c == "label" else float) for c in CELL_COLUMNS}


def ellipse_mask(radius_row: float, radius_col: float, angle: float, frac_row: float = 0.0,
                 frac_col: float = 0.0, *, half: Optional[int] = None) -> np.ndarray:
    """Boolean stencil of shape (2h+1, 2h+1) of a rotated ellipse centred at (h + frac_row, h + frac_col).

    A pixel ``(i, j)`` is inside when, with ``dy = i - h - frac_row`` and
    ``dx = j - h - frac_col``, ``u = dy cos(angle) + dx sin(angle)`` and
    ``v = dx cos(angle) - dy sin(angle)`` satisfy ``(u/radius_row)^2 + (v/radius_col)^2 <= 1``:
    the row semi-axis turned by ``angle`` radians. The centre pixel is always inside.
    ``h`` defaults to ``ceil(max radius) + 1``.

    Examples
    --------
    >>> ellipse_mask(2.5, 1.5, 0.0).astype(int)
    array([[0, 0, 0, 0, 0, 0, 0, 0, 0],
           [0, 0, 0, 0, 0, 0, 0, 0, 0],
           [0, 0, 0, 0, 1, 0, 0, 0, 0],
           [0, 0, 0, 1, 1, 1, 0, 0, 0],
           [0, 0, 0, 1, 1, 1, 0, 0, 0],
           [0, 0, 0, 1, 1, 1, 0, 0, 0],
           [0, 0, 0, 0, 1, 0, 0, 0, 0],
           [0, 0, 0, 0, 0, 0, 0, 0, 0],
           [0, 0, 0, 0, 0, 0, 0, 0, 0]])
    """
    h = _half(max(radius_row, radius_col)) if half is None else half
    gy, gx = _grid(h)
    dy, dx = gy - np.float32(frac_row), gx - np.float32(frac_col)
    c, s = np.cos(angle), np.sin(angle)
    ir, ic = 1.0 / max(radius_row, 1e-3), 1.0 / max(radius_col, 1e-3)
    u = dy * np.float32(c * ir) + dx * np.float32(s * ir)
    v = dx * np.float32(c * ic) - dy * np.float32(s * ic)
    u *= u
    v *= v
    u += v
    mask = u <= 1.0
    mask[h, h] = True
    return mask


@functools.lru_cache(maxsize=64)
def _grid(h: int) -> tuple[np.ndarray, np.ndarray]:
    off = np.arange(-h, h + 1, dtype=np.float32)
    return off[:, None], off[None, :]


def _half(max_radius: float) -> int:
    return int(np.ceil(max_radius)) + 1


class _Canvas:
    """Instance labels padded by a margin ``h``, so that stencils never need clipping.

    Image pixel ``(i, j)`` is padded pixel ``(i + h, j + h)``; a cell centred at
    ``(r, c)`` inside the image has its stencil at padded rows ``int(r) .. int(r) + 2h``.
    """

    def __init__(self, shape, half: int) -> None:
        self.shape, self.h = tuple(shape), half
        self.labels = np.zeros((shape[0] + 2 * half, shape[1] + 2 * half), dtype=np.uint16)
        self.valid = np.zeros(self.labels.shape, dtype=bool)
        self.valid[half:half + shape[0], half:half + shape[1]] = True

    def stencil(self, r, c, radius_row, radius_col, angle):
        """Window slices into ``labels`` and the in-image ellipse mask of a cell centred in the image."""
        r0, c0 = int(r), int(c)
        sl = (slice(r0, r0 + 2 * self.h + 1), slice(c0, c0 + 2 * self.h + 1))
        mask = ellipse_mask(radius_row, radius_col, angle, r - r0, c - c0, half=self.h)
        return sl, mask & self.valid[sl]

    def cropped(self) -> np.ndarray:
        h = self.h
        return self.labels[h:h + self.shape[0], h:h + self.shape[1]].copy()


def requested_count(params: LayoutParams, rng: np.random.Generator) -> int:
    """Draw the number of cells to request.

    A gamma distribution with mean ``count_mean`` and standard deviation
    ``count_std`` (cell counts are positive and right-skewed, as in IDCIA:
    141 +- 123 per image), rounded and truncated to ``[count_min, count_max]``
    by re-drawing, so that no count is more likely than its neighbours (a
    clamp would pile the tails onto the bounds). ``count_std = 0`` always
    requests ``count_mean``. After 64 misses (a range far in a tail) the
    nearest bound is used.

    Examples
    --------
    >>> p = LayoutParams(count_mean=50, count_std=30, count_min=10, count_max=60)
    >>> counts = [requested_count(p, np.random.default_rng(s)) for s in range(400)]
    >>> min(counts) >= 10 and max(counts) <= 60, counts.count(10) < 10
    (True, True)
    """
    lo, hi = params.count_min, params.count_max
    mean, std = params.count_mean, params.count_std
    if mean == 0 or std <= 1e-6 * mean:  # no spread to speak of (and (mean/std)**2 would overflow)
        return int(np.clip(round(mean), lo, hi))
    with np.errstate(all="ignore"):
        shape, scale = (mean / std) ** 2, std * std / mean
    if not (np.isfinite(shape) and np.isfinite(scale) and shape > 0 and scale > 0):
        return int(np.clip(round(mean), lo, hi))  # a degenerate (tiny or huge) mean/std ratio
    for _ in range(64):
        draw = rng.gamma(shape, scale)
        if not np.isfinite(draw):
            continue
        n = round(draw)
        if lo <= n <= hi:
            return int(n)
    return int(np.clip(round(mean), lo, hi))


class _Room:
    """Where a cell still fits: pixels at least ``need`` px from every placed cell (refreshed when stale)."""

    def __init__(self, canvas: _Canvas, need: float) -> None:
        self.canvas, self.need, self.stale, self.free = canvas, need, True, None

    def candidates(self) -> np.ndarray:
        if self.stale:
            from scipy.ndimage import distance_transform_cdt

            # chessboard distance <= Euclidean distance: a pixel counted free is free in a disc of that radius
            dist = distance_transform_cdt(self.canvas.cropped() == 0, metric="chessboard")
            self.free = np.flatnonzero(dist.ravel() >= self.need)
            self.stale = False
        return self.free


def _sample_geometry(params: LayoutParams, rng: np.random.Generator):
    """Place cells with the overlap rule; return (labels, table).

    Each cell is first drawn around its cluster centre; when ``max_tries`` such
    draws all fail (a crowded cluster), it is drawn among the pixels where a cell
    still fits, weighted by its cluster's Gaussian, so that the number placed
    follows the number requested until the image itself is full.
    """
    rows, cols = params.shape
    n_target = requested_count(params, rng)
    n_clusters = int(rng.integers(params.clusters[0], params.clusters[1] + 1))
    centres = rng.uniform((0, 0), (rows, cols), size=(n_clusters, 2))
    spread = params.cluster_spread * min(rows, cols)
    half = params.cell_size / 2.0
    lo, hi = 1.0 - params.axis_jitter, 1.0 + params.axis_jitter
    max_tries = params.max_tries
    # Draw every candidate up front: one vectorised call per quantity.
    m = n_target * max_tries
    which = rng.integers(0, n_clusters, size=n_target)
    offsets = rng.normal(0.0, spread, size=(m, 2))
    radii = half * rng.uniform(lo, hi, size=(m, 2))
    angles = rng.uniform(-np.pi, np.pi, size=m) if params.rotation else np.zeros(m)
    intens = rng.uniform(params.intensity[0], params.intensity[1], size=n_target)
    canvas = _Canvas(params.shape, _half(half * hi))
    room = _Room(canvas, max(1.0, half * lo))
    table = {c: [] for c in CELL_COLUMNS}
    k = 0

    def place(r, c, t) -> bool:
        nonlocal k
        if not (0 <= r < rows and 0 <= c < cols) or canvas.labels[int(r) + canvas.h, int(c) + canvas.h]:
            return False
        sl, mask = canvas.stencil(r, c, radii[t, 0], radii[t, 1], angles[t])
        win = canvas.labels[sl]
        under = win[mask]
        if np.count_nonzero(under) > params.max_overlap * under.size:
            return False
        k += 1
        mask[mask] = under == 0
        win[mask] = k
        for col, v in zip(CELL_COLUMNS, (k, r, c, radii[t, 0], radii[t, 1], angles[t], intens[i])):
            table[col].append(v)
        room.stale = True
        return True

    full = False
    for i in range(n_target):
        base = centres[which[i]]
        tries = range(i * max_tries, (i + 1) * max_tries)
        if any(place(*(base + offsets[t]), t) for t in tries) or full:
            continue
        free = room.candidates()  # the cluster is crowded: where in the image does a cell still fit?
        if free.size == 0:
            full = True  # no room anywhere: the remaining cells cannot be placed
            continue
        fr, fc = np.divmod(free, cols)
        s2 = 2.0 * max(spread, 1.0) ** 2
        weight = np.exp(-(np.arange(rows) - base[0]) ** 2 / s2)[fr] * np.exp(-(np.arange(cols) - base[1]) ** 2 / s2)[fc]
        total = weight.sum()
        pick = rng.choice(free.size, size=min(max_tries, free.size), replace=False,
                          p=weight / total if total > 0 else None)
        jitter = rng.uniform(0.0, 1.0, size=(pick.size, 2))
        for j, t in zip(range(pick.size), tries):
            if place(fr[pick[j]] + jitter[j, 0], fc[pick[j]] + jitter[j, 1], t):
                break
    labels = canvas.cropped()
    out = {c: np.asarray(v, dtype=np.uint16 if c == "label" else float) for c, v in table.items()}
    return labels, out if k else _empty_table()


def _paint_table(cells: dict, shape) -> np.ndarray:
    """Rasterise a cell table (centres inside the image) into labels, first cell wins."""
    biggest = max([1.0, *np.asarray(cells["radius_row"]), *np.asarray(cells["radius_col"])])
    canvas = _Canvas(shape, _half(biggest))
    for k in range(len(cells["row"])):
        sl, mask = canvas.stencil(cells["row"][k], cells["col"][k], cells["radius_row"][k],
                                  cells["radius_col"][k], cells["angle"][k])
        win = canvas.labels[sl]
        mask &= win == 0
        win[mask] = k + 1
    return canvas.cropped()


def _draw_appearance(shape, params: LayoutParams, rng: np.random.Generator) -> Appearance:
    """The look's random draws, in the generator's order: background, noise field, contrast, brightness."""
    background = rng.random()
    noise = rng.standard_normal(tuple(shape), dtype=np.float32) if params.noise_std > 0 else None
    return Appearance(background=background, noise=noise, contrast=rng.random(), brightness=rng.random())


def _within(bounds, u: float) -> float:
    lo, hi = bounds
    return lo + (hi - lo) * u  # numpy's Generator.uniform(lo, hi) from the same draw, to the bit


def _appearance(labels: np.ndarray, intensity: np.ndarray, params: LayoutParams, look: Appearance) -> np.ndarray:
    """Background, cell intensities, blur, noise, contrast and brightness -> uint8."""
    lut = np.concatenate([[0.0], np.asarray(intensity, dtype=np.float32)]).astype(np.float32)
    background = _within(params.background, look.background)
    cells = lut[labels]
    if params.blur_sigma > 0:
        from scipy.ndimage import gaussian_filter

        cells = gaussian_filter(cells, params.blur_sigma)
    img = np.maximum(cells, np.float32(background))
    if params.noise_std > 0:
        img += look.noise * np.float32(params.noise_std)
    alpha = _within(params.contrast, look.contrast)
    beta = _within(params.brightness, look.brightness)
    img = img * np.float32(alpha) + np.float32(beta)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def generate_layout(params: Optional[LayoutParams] = None, *, rng: RngLike = None) -> Layout:
    """Generate one Syn-HC layout.

    Parameters
    ----------
    params : LayoutParams, optional
        Generator parameters (defaults: the paper's 256x256 set-up).
    rng : numpy.random.Generator or int, optional
        Random source or seed; the same seed gives the same layout.

    Returns
    -------
    Layout
        Image (uint8), instance labels (uint16), centres and the per-cell table.

    Examples
    --------
    >>> lay = generate_layout(LayoutParams(shape=(64, 64), count_mean=10, count_std=0), rng=0)
    >>> lay.image.shape, lay.image.dtype, lay.labels.dtype
    ((64, 64), dtype('uint8'), dtype('uint16'))
    >>> bool(lay.n_cells == lay.labels.max() == len(lay.cells["row"]))
    True
    """
    params = params or LayoutParams()
    if not isinstance(params, LayoutParams):
        raise TypeError(f"params must be a LayoutParams, got {type(params).__name__}")
    rng = np.random.default_rng(rng)
    labels, table = _sample_geometry(params, rng)
    look = _draw_appearance(labels.shape, params, rng)
    image = _appearance(labels, table["intensity"], params, look)
    centres = np.stack([table["row"], table["col"]], axis=1) if len(table["row"]) else np.zeros((0, 2))
    return Layout(image=image, labels=labels, centres=centres, cells=table, appearance=look)


def render_layout(
    cells: dict, *, params: Optional[LayoutParams] = None, rng: RngLike = None,
    appearance: Optional[Appearance] = None,
) -> Layout:
    """Render a given cell table (e.g. cells drawn by hand) with the generator's appearance.

    No overlap rule is applied: every listed cell whose centre lies inside the
    image is drawn (others are left out of the result), earlier cells win shared pixels. Missing ``radius_row``/``radius_col``/``angle``/``intensity``
    columns take the defaults of ``params`` (``cell_size``/2, 0, mid intensity).

    Parameters
    ----------
    cells : dict of str to array-like
        At least ``row`` and ``col``.
    params : LayoutParams, optional
        Image shape and appearance.
    rng : numpy.random.Generator or int, optional
        Random source for background, noise, contrast and brightness.
    appearance : Appearance, optional
        Reuse these draws instead (e.g. ``layout.appearance`` of the layout being
        edited): the noise and the look stay, and only the pixels of changed cells
        (and their blur) change. Ignored when it does not fit ``params``
        (another shape, or noise now switched on).

    Examples
    --------
    >>> p = LayoutParams(shape=(40, 40))
    >>> lay = render_layout({"row": [10, 30], "col": [10, 30]}, params=p, rng=1)
    >>> lay.n_cells, int(lay.labels[10, 10]), int(lay.labels[30, 30])
    (2, 1, 2)
    >>> more = render_layout({"row": [10, 30, 20], "col": [10, 30, 5]}, params=p, appearance=lay.appearance)
    >>> changed = more.image != lay.image
    >>> bool(np.all(more.labels[changed] == 3))
    True
    """
    params = params or LayoutParams()
    if "row" not in cells or "col" not in cells:
        raise ValueError(f"cells needs 'row' and 'col' columns, got {sorted(cells)}")
    n = len(np.atleast_1d(cells["row"]))
    defaults = {
        "radius_row": params.cell_size / 2.0,
        "radius_col": params.cell_size / 2.0,
        "angle": 0.0,
        "intensity": float(np.mean(params.intensity)),
    }
    table = {"label": np.arange(1, n + 1, dtype=np.uint16)}
    for col in CELL_COLUMNS[1:]:
        v = cells.get(col, defaults.get(col))
        v = np.broadcast_to(np.asarray(v, dtype=float), (n,)).copy()
        if not np.all(np.isfinite(v)):
            raise ValueError(f"cells[{col!r}] has non-finite values")
        table[col] = v
    inside = (table["row"] >= 0) & (table["row"] < params.shape[0]) & (table["col"] >= 0) & (table["col"] < params.shape[1])
    table = {k: v[inside] for k, v in table.items()}
    table["label"] = np.arange(1, len(table["row"]) + 1, dtype=np.uint16)
    labels = _paint_table(table, params.shape)
    if appearance is None or not appearance.fits(params):
        appearance = _draw_appearance(labels.shape, params, np.random.default_rng(rng))
    image = _appearance(labels, table["intensity"], params, appearance)
    centres = np.stack([table["row"], table["col"]], axis=1).reshape(-1, 2)
    return Layout(image=image, labels=labels, centres=centres, cells=table, appearance=appearance)
