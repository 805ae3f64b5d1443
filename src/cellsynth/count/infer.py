"""Counting cells in images of any size: tiling, blending, peaks -> points, stacks.

Density counters run on overlapping tiles whose predictions are blended with
weights that fall off quadratically towards each tile's edge, where the network
lacks context (normalised by the summed weights), so a cell on a seam is predicted by every tile that sees it and its
mass is averaged, never added twice. The image is mirrored by ``overlap``
pixels on every side first, so cells at the image border get full context too.
With ``overlap=0`` (and always for regression counters) the image is cut into
non-overlapping windows, the last ones padded with background, and the window
counts are summed: the InST-Microscopy paper's evaluation.

torch is imported inside the functions.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

from ..progress import ProgressCallback, report
from .classic import ClassicParams, classic_peaks, estimate_diameter
from .models import Counter, load_counter
from .objects import ObjectParams, reconcile_with_objects
from .preprocess import counter_input, rescale_plane, split_planes
from .peaks import density_peaks
from .tiling import _blend_window, _pad_to, _plane_tiles, tile_layout, tile_starts

__all__ = ["CountResult", "count_cells", "density_peaks", "density_points", "model_density",
           "resolve_diameter", "scale_factor", "tile_layout", "tile_starts"]


#: Tiles per forward pass on the CPU (see ``count_cells(batch_size=...)``).
CPU_BATCH = 2


@dataclass
class CountResult:
    """What :func:`count_cells` returns.

    Attributes
    ----------
    count : int or float
        Total count over all planes: the number of points for counters that give
        positions (density, classic), an int; the sum of window counts for
        regression counters (no positions), a float.
    points : ndarray of shape (K, 2) or (K, 2 + S)
        Cell positions ``(row, col)``, with the stack coordinates first for stacks
        (``(plane, row, col)`` for a 3D stack). Empty for regression counters.
    scores : ndarray of shape (K,)
        Confidence per point: the peak height relative to a lone cell's (density),
        the LoG response (classic).
    density : ndarray or None
        Density map (cells per pixel) of the input's planes, shape ``stack + (M, N)``;
        None for classic and regression counters.
    windows : list of tuple
        Regression only: ``(row0, col0, rows, cols, count)`` per window in input
        pixels, prefixed by the plane index for stacks.
    per_plane : ndarray of shape stack (``(1,)`` for a 2D image)
        Count of each plane (as ``count``).
    density_sum : float or None
        Density counters: the sum of the density map over all planes, a second,
        fractional estimate of the count (None for the other kinds).
    meta : dict
        Provenance: operation, model name, kind, weights hash, parameters, version.
    areas : ndarray of shape (K,) or None
        Area in pixels of each point's nucleus object (NaN where a point has none),
        when measured (:func:`~cellsynth.count.objects.nucleus_areas`); None otherwise.
    """

    count: Union[int, float]
    points: np.ndarray
    scores: np.ndarray
    density: Optional[np.ndarray]
    windows: list = field(default_factory=list)
    per_plane: np.ndarray = field(default_factory=lambda: np.zeros(1))
    density_sum: Optional[float] = None
    meta: dict = field(default_factory=dict)
    areas: Optional[np.ndarray] = None

    @property
    def n_points(self) -> int:
        return int(len(self.points))


def _inference_net(counter: Counter):
    """The counter's network with BatchNorm folded in (see :meth:`Counter.inference_net`)."""
    return counter.inference_net()


def _engine(counter: Counter, engine: Optional[str]):
    """``(name, ORT runner or None)``: onnxruntime on the CPU when installed and the network exports."""
    from . import engines

    name = engines.resolve_engine(engine, counter.device_name)
    if name != "onnxruntime":
        return "torch", None
    runner = engines.session_for(counter)
    return ("onnxruntime", runner) if runner is not None else ("torch (onnxruntime could not run this counter)", None)


def _run_batches(counter: Counter, tiles: list[np.ndarray], batch_size: int, progress, done: list, total: int,
                 runner=None):
    net = _inference_net(counter) if runner is None else None
    outs = []
    for i in range(0, len(tiles), batch_size):
        batch = np.stack(tiles[i:i + batch_size])[:, None]
        if runner is not None:
            outs.append(runner(batch))
        else:
            import torch

            x = torch.from_numpy(batch).to(device=counter.device, dtype=counter.dtype)
            if counter.device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            outs.append(net(x).float().cpu().numpy())
        if not np.all(np.isfinite(outs[-1])):
            raise ValueError(f"the counter {counter.name!r} gives NaN or infinite values on this image: its weights "
                             "are broken (e.g. a diverged training); retrain it with a smaller learning rate or use "
                             "another counter")
        done[0] += len(batch)
        report(progress, "tiles", done[0], total)
    return np.concatenate(outs, axis=0) if outs else np.zeros((0,))


def _density_plane(counter, plane, *, grid=None, tile, overlap, batch_size, progress, done, total, runner=None):
    stride = counter.stride
    tiles, boxes, (t_r, t_c), m, pshape = _plane_tiles(plane, tile, overlap, stride, grid)
    preds = _run_batches(counter, tiles, batch_size, progress, done, total, runner)[:, 0]
    scale = counter.settings.density_scale
    acc = np.zeros(pshape, np.float32)
    wsum = np.zeros(pshape, np.float32)
    win = _blend_window(t_r, overlap) if t_r == t_c else np.outer(
        _blend_window(t_r, overlap)[:, t_r // 2], _blend_window(t_c, overlap)[t_c // 2]
    )
    for (r, c), p in zip(boxes, preds):
        acc[r:r + t_r, c:c + t_c] += p * win
        wsum[r:r + t_r, c:c + t_c] += win
    dens = acc / np.maximum(wsum, 1e-12) / scale
    return dens[m:m + plane.shape[0], m:m + plane.shape[1]]


def _regression_plane(counter, plane, *, window, batch_size, progress, done, total, runner=None):
    tiles, boxes, (t_r, t_c), _, _ = _plane_tiles(plane, window, 0, 32)
    preds = _run_batches(counter, tiles, batch_size, progress, done, total, runner)
    out = []
    for (r, c), p in zip(boxes, preds):
        rows = min(t_r, plane.shape[0] - r)
        cols = min(t_c, plane.shape[1] - c)
        out.append((r, c, rows, cols, float(p)))
    return out


def _n_tiles(shape, kind, tile, overlap) -> int:
    rows, cols = shape
    if kind == "density" and overlap > 0:
        rows, cols = rows + 2 * overlap, cols + 2 * overlap
        return len(tile_layout(rows, tile, overlap)[1]) * len(tile_layout(cols, tile, overlap)[1])
    return int(np.ceil(rows / tile) * np.ceil(cols / tile))


@functools.lru_cache(maxsize=4)
def _cached(model: str, device: str, stamp: tuple) -> Counter:
    return load_counter(model, device=device)


def _cached_counter(model: str, device: str) -> Counter:
    """Load a counter once per (name, device, weights file state): retraining in place reloads."""
    from pathlib import Path

    from ..weights import resources_dir

    p = resources_dir() / "models" / "counter-default" if model == "default" else Path(model)
    w = p / "model.safetensors" if p.is_dir() else p
    stamp = (w.stat().st_mtime_ns, w.stat().st_size) if w.is_file() else ()
    return _cached(model, device, stamp)


@dataclass
class _Plan:
    """Everything counting decides once for all planes of one image."""

    counter: Counter
    diameter: Optional[float]
    factor: float
    tile: int
    overlap: int
    batch_size: int
    objects: Optional[ObjectParams]
    percentiles: Optional[tuple]
    foreground: Optional[float]
    tile_grid: Optional[tuple]
    progress: Optional[ProgressCallback]
    engine: str = "none"
    runner: Any = None
    total: int = 0
    done: list = field(default_factory=lambda: [0])


@dataclass
class _Plane:
    """One plane counted: points and scores in input pixels, its count, density (input scale) and windows."""

    points: np.ndarray
    scores: np.ndarray
    count: float
    density: Optional[np.ndarray] = None
    density_sum: Optional[float] = None
    windows: list = field(default_factory=list)


def _check_settings(arr: np.ndarray, tile, overlap, batch_size) -> tuple[int, int]:
    """Refuse what cannot be counted; ``(tile, overlap)`` as integers."""
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"image must be a numeric array, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise TypeError("image must be real-valued, got a complex array")
    if arr.ndim > 5:
        raise ValueError(f"image has {arr.ndim} dimensions (shape {arr.shape}); expected 2 to 5")
    if int(tile) != tile or tile < 64 or tile % 32 or tile > 4096:
        raise ValueError(f"tile must be a multiple of 32 from 64 to 4096, got {tile!r}")
    tile = int(tile)
    if overlap is None:
        overlap = tile // 8
    if int(overlap) != overlap or not 0 <= overlap <= tile // 2:
        raise ValueError(f"overlap must be an integer in [0, tile/2 = {tile // 2}], got {overlap!r}")
    if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return tile, int(overlap)


def _the_counter(counter, model, device) -> Counter:
    if counter is None:
        return _cached_counter(str(model), str(device)) if isinstance(model, str) else load_counter(model, device=device)
    if not isinstance(counter, Counter):
        raise TypeError(f"counter must be a Counter from load_counter, got {type(counter).__name__}")
    return counter


def _make_plan(counter: Counter, planes: np.ndarray, diameter, *, tile, overlap, batch_size, engine,
               **rest) -> _Plan:
    kind = counter.kind
    factor = scale_factor(counter, diameter)
    batch = int(batch_size) if batch_size is not None else (CPU_BATCH if counter.device_name == "cpu" else 8)
    objects = counter.settings.objects
    plan = _Plan(counter=counter, diameter=diameter, factor=factor, tile=tile, overlap=overlap, batch_size=batch,
                 objects=ObjectParams(**objects) if kind == "density" and objects else None, **rest)
    if kind != "classic":
        work_shape = [max(1, int(round(s * factor))) for s in planes.shape[1:]]
        t_eff = counter.config.get("window", tile) if kind == "regression" else tile
        plan.total = len(planes) * _n_tiles(work_shape, kind, int(t_eff), overlap)
    _check_memory(planes, factor, tile, batch, kind, len(planes))
    if kind != "classic":
        plan.engine, plan.runner = _engine(counter, engine)
    return plan


def density_points(counter: Counter, plane: np.ndarray, density: np.ndarray, *, factor: float,
                   foreground: Optional[float] = None, peak_threshold: Optional[float] = None,
                   objects: Union[ObjectParams, None, str] = "counter") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points of a density counter's prediction: peaks at the model scale, mapped back, reconciled with objects.

    Parameters
    ----------
    counter : Counter
        A density counter (its diameter, sigma and settings).
    plane : ndarray of shape (M, N)
        The normalised input plane (:func:`~cellsynth.count.preprocess.counter_input`).
    density : ndarray
        The network's density at the model scale (the plane rescaled by ``factor``).
    factor : float
        Model scale over input scale.
    foreground : float, optional
        Foreground threshold for the objects (default: Otsu's of the plane).
    peak_threshold : float, optional
        Minimum peak height (default: the counter's).
    objects : ObjectParams, None or "counter"
        How peaks are reconciled with foreground objects (None: not at all;
        ``"counter"``: as the counter's config says).

    Returns
    -------
    points, scores, density at the input scale (same sum as ``density``)
    """
    s = counter.settings
    if isinstance(objects, str):
        objects = ObjectParams(**s.objects) if s.objects else None
    pts, sc = density_peaks(density, min_distance=0.3 * counter.diameter, sigma=s.sigma,
                            threshold=s.peak_threshold if peak_threshold is None else peak_threshold)
    dens = density
    if factor != 1.0:
        total = float(density.sum(dtype=np.float64))
        pts = (pts + 0.5) / factor - 0.5
        back = rescale_plane(density, 1.0 / factor)
        back = _pad_to(back[: plane.shape[0], : plane.shape[1]], plane.shape[0], plane.shape[1])
        s_back = float(back.sum(dtype=np.float64))
        dens = back * (total / s_back) if s_back > 0 else back
    if objects is not None:
        pts, sc = reconcile_with_objects(plane, pts, sc, dens, diameter=counter.diameter / factor,
                                         params=objects, threshold=foreground)
    return pts, sc, dens


def model_density(counter: Counter, plane: np.ndarray, factor: float, **kw) -> np.ndarray:
    """A density counter's prediction for a normalised plane rescaled by ``factor`` (the model scale).

    ``kw``: ``tile`` (256), ``overlap`` (``tile // 8``), ``batch_size``, ``progress``,
    ``runner`` (an onnxruntime session; default PyTorch).
    """
    tile = int(kw.get("tile", 256))
    runner = kw.get("runner")
    with _no_autograd(runner):
        return _density_plane(counter, rescale_plane(plane, factor), grid=kw.get("grid"), tile=tile,
                              overlap=int(kw.get("overlap", tile // 8)),
                              batch_size=int(kw.get("batch_size") or CPU_BATCH), progress=kw.get("progress"),
                              done=kw.get("done", [0]), total=int(kw.get("total", 0)), runner=runner)


def _count_plane(plan: _Plan, raw: np.ndarray, index: int, n_planes: int) -> _Plane:
    counter = plan.counter
    plane = counter_input(raw, counter.config.get("normalize", {}), plan.percentiles)
    if counter.kind == "classic":
        cp = dict(counter.config.get("classic", {}))
        cp["diameter"] = plan.diameter if plan.diameter is not None else _safe_estimate(plane, counter.diameter)
        if plan.foreground is not None:
            cp["threshold"] = float(plan.foreground)
        pts, sc = classic_peaks(plane, ClassicParams(**cp))
        report(plan.progress, "planes", index + 1, n_planes)
        return _Plane(pts, sc, float(len(pts)))
    common = dict(tile=plan.tile, overlap=plan.overlap, batch_size=plan.batch_size, progress=plan.progress,
                  done=plan.done, total=plan.total, runner=plan.runner)
    if counter.kind == "density":
        dens = model_density(counter, plane, plan.factor, grid=plan.tile_grid, **common)
        total = float(dens.sum(dtype=np.float64))
        pts, sc, dens = density_points(counter, plane, dens, factor=plan.factor, foreground=plan.foreground,
                                       objects=plan.objects)
        return _Plane(pts, sc, len(pts), dens.astype(np.float32), total)
    with _no_autograd(plan.runner):
        wins = _regression_plane(counter, rescale_plane(plane, plan.factor),
                                 window=int(counter.config.get("window", plan.tile)), **{
                                     k: v for k, v in common.items() if k not in ("tile", "overlap")})
    f = plan.factor
    windows = [(int(round(r0 / f)), int(round(c0 / f)), int(round(nr / f)), int(round(nc / f)), v)
               for r0, c0, nr, nc, v in wins]
    return _Plane(np.zeros((0, 2)), np.zeros(0), float(sum(w[-1] for w in wins)), windows=windows)


def _assemble(plan: _Plan, done: list[_Plane], lead: tuple, meta: dict) -> CountResult:
    all_pts, windows = [], []
    for p, res in enumerate(done):
        pts = res.points.reshape(-1, 2)
        if lead:
            coords = np.array(np.unravel_index(p, lead), dtype=float)
            pts = np.concatenate([np.broadcast_to(coords, (len(pts), len(lead))), pts], axis=1)
            windows += [(p,) + w for w in res.windows]
        else:
            windows += res.windows
        all_pts.append(pts)
    kind = plan.counter.kind
    per = np.array([r.count for r in done], dtype=float).reshape(lead if lead else (1,))
    dens = [r.density for r in done if r.density is not None]
    density = (np.stack(dens).reshape(lead + dens[0].shape) if lead else dens[0]) if dens else None
    sums = [r.density_sum for r in done if r.density_sum is not None]
    return CountResult(
        count=float(per.sum()) if kind == "regression" else int(round(float(per.sum()))),
        points=np.concatenate(all_pts, axis=0),
        scores=np.concatenate([np.asarray(r.scores, float) for r in done]) if done else np.zeros(0),
        density=density, windows=windows, per_plane=per,
        density_sum=float(np.sum(sums)) if sums else None, meta=meta)


def count_cells(
    image: np.ndarray,
    *,
    counter: Optional[Counter] = None,
    model: Union[str, Any] = "default",
    diameter: Union[float, str, None] = "auto",
    channel: Optional[int] = None,
    channel_axis: Optional[int] = None,
    device: Any = "auto",
    tile: int = 256,
    overlap: Optional[int] = None,
    batch_size: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
    percentiles: Optional[tuple[float, float, float]] = None,
    foreground: Optional[float] = None,
    tile_grid: Optional[tuple] = None,
    engine: Optional[str] = "auto",
) -> CountResult:
    """Count cells in a 2D image, a multichannel image or a stack of planes.

    Parameters
    ----------
    image : ndarray
        ``(M, N)`` of any size (also smaller than a tile), uint8/uint16/float;
        ``(M, N, C)`` with ``C <= 4``; or a stack ``(..., M, N)`` (3D, time),
        counted plane by plane. See :func:`~cellsynth.count.preprocess.split_planes`.
    counter : Counter, optional
        A loaded counter (see :func:`load_counter`); overrides ``model``.
    model : str or path
        ``"default"``, ``"classic"`` or a model path, used when ``counter`` is None.
    diameter : float, "auto" or None
        Typical cell diameter in pixels. The image is rescaled so that cells
        match the counter's training scale (:attr:`Counter.diameter`); points and
        density are mapped back. ``"auto"`` (the default) estimates it with
        :func:`estimate_diameter` (on the middle plane of a stack); the value used
        is in ``meta["diameter_used"]``. None: count at the counter's own scale,
        without rescaling (the classic counter then estimates the diameter).
    channel, channel_axis : int, optional
        Channel to count in a multichannel image (default: max over channels).
    device : str or torch.device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``; used when ``counter`` is None.
    tile : int
        Tile (window) side in pixels at the model scale; a multiple of 32, >= 64.
    overlap : int, optional
        Density counters: overlap of neighbouring tiles and mirrored margin in
        pixels (default ``tile // 8``); 0 gives non-overlapping windows summed.
        Ignored by regression (always non-overlapping windows) and classic counters.
    batch_size : int, optional
        Tiles per forward pass; default 2 on the CPU (small batches stay in the
        processor's caches: a 2048x2048 count is ~15 % faster than with 8) and 8 on GPUs.
    progress : ProgressCallback, optional
        Called once per batch of tiles (stage ``"tiles"``), or per plane for the
        classic counter (stage ``"planes"``), after ``"estimating the cell
        diameter"`` with ``diameter="auto"``; may raise ``Cancelled``.
    engine : {"auto", "torch", "onnxruntime"}
        What runs the network: ``"auto"`` (default) uses onnxruntime on the CPU
        when it is installed (faster there; see :mod:`cellsynth.count.engines`),
        PyTorch otherwise and on GPUs; ``$CELLSYNTH_ENGINE`` overrides ``"auto"``.
        The engine used is in ``meta["engine"]``.
    percentiles : tuple of 3 float, optional
        Intensity percentiles ``(low, high, 99.99)`` of the counter's normalisation
        computed elsewhere, e.g. once over a large image counted in tiles
        (:mod:`cellsynth.batch`); default: from each plane.
    foreground : float, optional
        Foreground threshold of the smoothed normalised plane (objects
        reconciliation, classic counter) computed elsewhere likewise; default:
        Otsu's threshold of each plane.
    tile_grid : tuple, optional
        Density counters with ``overlap > 0``: ``(rows, row starts, cols, col
        starts)`` of the tiles in the plane mirrored by ``overlap`` at the model scale,
        laid out elsewhere, e.g. the tiles of a large image that fall in one of
        its chunks; default: :func:`tile_layout` of each plane.

    Returns
    -------
    CountResult

    Raises
    ------
    ValueError, TypeError
        Bad image shape or dtype, bad channel, bad tile/overlap/diameter.

    Examples
    --------
    >>> from skimage.draw import disk
    >>> img = np.zeros((60, 90), np.uint8)
    >>> for c in (15, 45, 75):
    ...     img[disk((30, c), 6)] = 200
    >>> res = count_cells(img, model="classic", diameter=12)
    >>> res.count, res.points.shape
    (3, (3, 2))
    >>> count_cells(np.zeros((8, 9)), model="classic", tile=100)
    Traceback (most recent call last):
    ...
    ValueError: tile must be a multiple of 32 from 64 to 4096, got 100
    """
    from .. import __version__

    arr = np.asarray(image)
    tile, overlap = _check_settings(arr, tile, overlap, batch_size)
    planes, lead = split_planes(arr, channel=channel, channel_axis=channel_axis)
    if min(planes.shape[1:]) < 2:
        raise ValueError(f"image planes must be at least 2x2 pixels, got {planes.shape[1:]}")
    if isinstance(diameter, str):
        report(progress, "estimating the cell diameter", 0, 1)
    diameter, diameter_source = resolve_diameter(diameter, arr, channel, channel_axis)
    counter = _the_counter(counter, model, device)
    plan = _make_plan(counter, planes, diameter, tile=tile, overlap=overlap, batch_size=batch_size, engine=engine,
                      percentiles=percentiles, foreground=foreground, tile_grid=tile_grid, progress=progress)
    done = [_count_plane(plan, raw, p, len(planes)) for p, raw in enumerate(planes)]
    meta = {
        "operation": "count",
        **counter.describe(),
        "diameter_used": diameter,
        "diameter_source": diameter_source,
        "scale_factor": plan.factor,
        "tile": tile,
        "overlap": overlap if counter.kind == "density" else 0,
        "channel": channel,
        "device": counter.device_name,
        "engine": plan.engine,
        "n_planes": len(planes),
        "cellsynth_version": __version__,
    }
    if counter.kind == "regression":
        meta["note"] = "regression counter: counts per window, no cell positions"
    return _assemble(plan, done, lead, meta)


def _no_autograd(runner):
    """torch's inference mode around PyTorch counting; nothing (no torch import) when onnxruntime runs the network."""
    if runner is not None:
        import contextlib

        return contextlib.nullcontext()
    import torch

    return torch.inference_mode()


def _check_memory(planes, factor, tile, batch_size, kind, n_planes) -> None:
    """Refuse a count whose working arrays cannot fit in the memory free now (before allocating them)."""
    from ..io import require_memory

    rows, cols = planes.shape[1:]
    work = float(rows * factor) * float(cols * factor)
    # float32 copies of the plane at the input and the model scale, density, blending weights,
    # labels; plus one batch of tiles with the network's activations (~64 floats per pixel).
    need = 4.0 * (6 * rows * cols + 6 * work) + (4.0 * 64 * batch_size * tile * tile if kind != "classic" else 0)
    if n_planes > 1:
        need += 4.0 * rows * cols * n_planes  # the density of every plane is kept
    hint = ("give the cell diameter in pixels (--diameter): the image is rescaled by "
            f"{factor:.3g} to the model's scale" if factor > 4 else
            "count a crop or a smaller image, or use a smaller --tile / --batch-size")
    require_memory(need, what=f"counting {n_planes} plane(s) of {rows}x{cols} pixels", hint=hint)


def resolve_diameter(diameter, image, channel: Optional[int] = None,
                     channel_axis: Optional[int] = None) -> tuple[Optional[float], str]:
    """``(diameter in pixels or None, where it came from)``: given, estimated, or the model's scale.

    The one reading of a ``diameter`` argument for every counting path. ``image``
    is what ``"auto"`` estimates from: an array, or a callable returning one
    (read only when an estimate is needed, e.g. a crop of a large image).

    Examples
    --------
    >>> resolve_diameter(12, None)
    (12.0, 'given')
    >>> resolve_diameter(None, None)
    (None, 'model scale')
    """
    if isinstance(diameter, str):
        if diameter != "auto":
            raise ValueError(f"diameter must be a number of pixels, 'auto' or None, got {diameter!r}")
        try:
            arr = image() if callable(image) else image
            return estimate_diameter(arr, channel=channel, channel_axis=channel_axis), "estimated"
        except ValueError:
            # Nothing cell-like (e.g. an empty field): count at the model's own scale.
            return None, "model scale (no cells found to estimate a diameter)"
    if diameter is None:
        return None, "model scale"
    if isinstance(diameter, bool) or not (np.isscalar(diameter) and np.isreal(diameter)
                                          and np.isfinite(diameter) and diameter > 0):
        raise ValueError(f"diameter must be a positive number of pixels, got {diameter!r}")
    return float(diameter), "given"


def scale_factor(counter: Counter, diameter: Optional[float]) -> float:
    """Model scale over input scale: how much an image with cells of ``diameter`` px is resized for ``counter``.

    A counter whose config has a ``diameter_scale`` (fitted to corrections)
    takes the nuclei to be that multiple of ``diameter``.
    """
    s = counter.settings
    rescale = counter.kind != "classic" and diameter is not None and s.rescale
    return counter.diameter / (diameter * s.diameter_scale) if rescale else 1.0


def _safe_estimate(plane: np.ndarray, fallback: float) -> float:
    try:
        return estimate_diameter(plane)
    except ValueError:
        return float(fallback)
