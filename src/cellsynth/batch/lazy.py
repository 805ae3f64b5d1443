"""Counting an image too large for memory: overlapping chunks, image-wide statistics, points in each core.

:func:`count_large` never holds the whole image. It reads one 2D plane through
dask (a dask array over a zarr store, a tiled TIFF, an OME-Zarr level, or any
array-like), computes the quantities :func:`~cellsynth.count.count_cells`
would take from the whole plane once, on strided samples (the same samples the
in-memory count uses), then counts overlapping chunks one at a time with those
quantities fixed and keeps each chunk's points inside its core:

1. the cell diameter (``"auto"``: on the central crop, as in memory);
2. the normalisation percentiles (on the plane sampled with the same stride);
3. the foreground threshold of the objects reconciliation (classic counter:
   of the seeded watershed), on the plane smoothed with ``map_overlap`` and
   sampled with the same stride;
4. the network's tiles, laid out once for the whole plane as ``count_cells``
   lays them out; each chunk reads every tile that reaches its core (and the
   peak neighbourhood around it) and is given those tiles, so that at the
   model's own scale (diameter equal to the counter's) each core sees the
   tiles, the blending and the objects it sees in memory and the points are
   the same; when the image is rescaled the chunks' pixel grids differ by a
   fraction of a pixel and the points agree to within about that.

numpy/scipy/dask only; torch is imported by the counter.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from ..progress import ProgressCallback, report

__all__ = ["ChunkPlan", "chunk_plan", "count_large", "image_statistics"]


@dataclass(frozen=True)
class ChunkPlan:
    """Where the chunks of one axis lie.

    Attributes
    ----------
    reads : list of (start, stop)
        The pixels each chunk reads (core plus margins), clipped to the image.
    cores : list of (start, stop)
        The pixels each chunk answers for; they partition ``[0, length)``.
    """

    reads: list
    cores: list


def chunk_plan(length: int, *, core: int, halo: int) -> ChunkPlan:
    """Chunks of one axis: cores of ``core`` pixels, each read with ``halo`` pixels on both sides.

    A remainder shorter than a quarter core joins the last core; an axis that
    fits in one chunk is one chunk.

    Examples
    --------
    >>> p = chunk_plan(1200, core=448, halo=100)
    >>> p.cores
    [(0, 448), (448, 896), (896, 1200)]
    >>> p.reads
    [(0, 548), (348, 996), (796, 1200)]
    >>> chunk_plan(540, core=448, halo=100).cores
    [(0, 540)]
    """
    if int(core) != core or core < 1 or int(halo) != halo or halo < 0:
        raise ValueError(f"core must be a positive and halo a non-negative whole number, got {core!r}, {halo!r}")
    if length <= core + halo:
        return ChunkPlan([(0, length)], [(0, length)])
    cores, reads = [], []
    start = 0
    while start < length:
        stop = start + core
        if length - stop <= core // 4:  # a small remainder joins the last core
            stop = length
        cores.append((start, stop))
        reads.append((max(0, start - halo), min(length, stop + halo)))
        start = stop
    return ChunkPlan(reads, cores)


def _as_dask(image):
    import dask.array as da

    if isinstance(image, da.Array):
        return image
    return da.from_array(image, chunks=_chunks_for(image.shape), asarray=True)


def _chunks_for(shape, side: int = 2048):
    return tuple(min(s, side) for s in shape[:-2]) + (min(shape[-2], side), min(shape[-1], side)) \
        if len(shape) > 2 else (min(shape[0], side), min(shape[1], side))


def _plane(image, channel: Optional[int], channel_axis: Optional[int]):
    """The 2D dask plane to count: one channel, or the maximum over them (as ``split_planes`` does)."""
    import dask.array as da

    x = _as_dask(image)
    if x.ndim < 2:
        raise ValueError(f"image must have at least 2 dimensions (rows, cols), got shape {x.shape}")
    colour = False
    if channel_axis is None and x.ndim == 3 and x.shape[-1] <= 4 and min(x.shape[:2]) > 4:
        channel_axis, colour = 2, x.shape[-1] == 4
    if channel_axis is not None:
        if not -x.ndim <= channel_axis < x.ndim:
            raise ValueError(f"channel_axis {channel_axis} is out of range for an image of shape {x.shape}")
        x = da.moveaxis(x, channel_axis, -1)
        if channel is None:
            x = (x[..., :3] if colour else x).max(axis=-1)
        elif not -x.shape[-1] <= int(channel) < x.shape[-1]:
            raise ValueError(f"channel {channel} does not exist; the image has {x.shape[-1]} channels")
        else:
            x = x[..., int(channel)]
    elif channel not in (None, 0):
        raise ValueError(f"channel {channel} was given but the image of shape {image.shape} has no channel axis")
    if x.ndim != 2:
        raise ValueError(f"large images are counted one 2D plane at a time; got shape {tuple(image.shape)} "
                         "(give one plane of the stack)")
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool) or np.iscomplexobj(x):
        raise TypeError(f"image must hold real numbers, got dtype {x.dtype}")
    return x


def _central_crop(plane, max_pixels: int = 640 * 640) -> np.ndarray:
    """The crop :func:`~cellsynth.count.estimate_diameter` analyses, read alone."""
    rows, cols = plane.shape
    side_r = min(rows, int(np.sqrt(max_pixels * rows / cols)) + 1)
    side_c = min(cols, max_pixels // max(side_r, 1) + 1)
    r0, c0 = (rows - side_r) // 2, (cols - side_c) // 2
    return np.asarray(plane[r0:r0 + side_r, c0:c0 + side_c])


def _stride(shape) -> int:
    """The sampling stride of ``normalize_image`` and ``foreground_threshold`` (about a million pixels)."""
    return max(1, int(np.sqrt(shape[0] * shape[1] / 1_000_000)))


def image_statistics(plane, counter, *, diameter: Union[float, str, None] = "auto") -> dict:
    """The whole-plane quantities of :func:`~cellsynth.count.count_cells`, computed lazily.

    Parameters
    ----------
    plane : dask array or array-like of shape (M, N)
    counter : Counter
    diameter : float, "auto" or None
        As in ``count_cells``.

    Returns
    -------
    dict
        ``diameter`` (pixels or None), ``diameter_source``, ``factor`` (rescaling
        to the model's scale), ``percentiles`` (or None for fixed normalisation)
        and ``foreground`` (threshold of the smoothed normalised plane, or None
        when the counter does not use one).

    Examples
    --------
    >>> from skimage.draw import disk
    >>> from cellsynth.count import load_counter
    >>> img = np.zeros((80, 80), np.uint8)
    >>> img[disk((30, 30), 6)] = 200
    >>> s = image_statistics(img, load_counter("classic"), diameter=12)
    >>> s["diameter"], s["factor"], bool(0 < s["foreground"] < 1)
    (12.0, 1.0, True)
    """
    from scipy.ndimage import gaussian_filter

    from ..count.classic import ClassicParams, foreground_threshold
    from ..count.infer import resolve_diameter, scale_factor
    from ..count.objects import ObjectParams
    from ..count.preprocess import counter_input

    x = _as_dask(plane)
    kind = counter.kind
    d, source = resolve_diameter(diameter, lambda: _central_crop(x))
    factor = scale_factor(counter, d)

    norm = counter.config.get("normalize", {})
    step = _stride(x.shape)
    percentiles = None
    if norm.get("mode") != "fixed":
        sample = np.asarray(x[::step, ::step].compute(), dtype=np.float32)
        if not np.all(np.isfinite(sample)):
            raise ValueError("image contains NaN or infinite values; replace them before counting")
        percentiles = tuple(float(v) for v in np.percentile(sample, [norm.get("low", 1.0), norm.get("high", 99.8),
                                                                     99.99]))

    def normalised(block):
        return counter_input(block, norm, percentiles)

    foreground = sigma = None
    if kind == "classic":
        cp = ClassicParams(**{**counter.config.get("classic", {}), "diameter": d or counter.diameter})
        foreground = cp.threshold
        if foreground is None:
            sigma = max(0.5, cp.outline_sigma * cp.diameter)
    elif kind == "density" and counter.config.get("objects"):
        sigma = max(0.5, ObjectParams(**counter.config["objects"]).outline_sigma * counter.diameter / factor)
    if sigma is not None:
        radius = int(4.0 * sigma + 0.5)  # scipy's kernel radius (truncate=4)
        z = x.rechunk(_chunks_for(x.shape)).map_blocks(normalised, dtype=np.float32)
        smooth = z.map_overlap(lambda b: gaussian_filter(b, sigma), depth=radius, boundary="none",
                               dtype=np.float32)
        p_s, s_s = (np.asarray(a) for a in _compute(z[::step, ::step], smooth[::step, ::step]))
        foreground = float(foreground_threshold(p_s, s_s, sigma=sigma))
    return {"diameter": d, "diameter_source": source, "factor": float(factor), "percentiles": percentiles,
            "foreground": foreground}


def _compute(*arrays):
    import dask

    return dask.compute(*arrays)


def _geometry(counter, stats: dict, *, tile: int, core: Optional[int]) -> tuple[int, int]:
    """``(core, halo)`` in input pixels for :func:`chunk_plan`."""
    factor = stats["factor"]
    if counter.kind == "classic":
        d = stats["diameter"] or counter.diameter
        return int(core or 4096), int(math.ceil(4 * d)) + 8
    # Every tile that reaches a core (or the peak neighbourhood around it) lies inside the chunk.
    margin_m = int(math.ceil(counter.diameter)) + 8
    halo = int(math.ceil((tile + margin_m) / factor)) + 2
    return int(core or max(64, round(1792 / factor))), halo


def _release_memory() -> None:
    """Hand the freed heap of one chunk back to the system (glibc), so chunks do not pile up in the peak."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _whole_layout(counter, shape, *, tile: int, overlap: int):
    """The tiles of the whole plane at the model's scale, as ``count_cells`` lays them out (or None)."""
    from ..count.infer import tile_layout

    if counter.kind != "density" or overlap <= 0:
        return None
    stride = counter.stride
    return (tile_layout(shape[0] + 2 * overlap, tile, overlap, stride),
            tile_layout(shape[1] + 2 * overlap, tile, overlap, stride))


def _chunk_grid(layout, reads, shape, overlap: int):
    """The whole plane's tiles that lie in one chunk (or touch the plane's own edge), in the chunk's coordinates."""
    if layout is None:
        return None
    out = []
    for (side, starts), (r0, r1), n in zip(layout, reads, shape):
        mine = [s - r0 for s in starts
                if (s - overlap >= r0 or r0 == 0) and (s - overlap + side <= r1 or r1 == n)]
        if not mine:
            return None
        out += [side, mine]
    return tuple(out)


def count_large(
    image: Any,
    *,
    counter: Any = None,
    model: Union[str, Any] = "default",
    diameter: Union[float, str, None] = "auto",
    channel: Optional[int] = None,
    channel_axis: Optional[int] = None,
    device: Any = "auto",
    tile: int = 256,
    overlap: Optional[int] = None,
    batch_size: Optional[int] = None,
    core: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
):
    """Count cells in a 2D image of any size, reading it chunk by chunk.

    Parameters
    ----------
    image : dask array, zarr array, ndarray or array-like
        ``(M, N)`` or ``(M, N, C)``; only the chunks being counted are read.
    counter, model, diameter, channel, channel_axis, device, tile, overlap, batch_size
        As in :func:`~cellsynth.count.count_cells`.
    core : int, optional
        Side of a chunk's core in input pixels;
        default 1792 pixels at the model's scale (about 1.6 GB peak with the
        default counter on a CPU, torch included). Peak memory grows with it.
    progress : ProgressCallback, optional
        Stage ``"statistics"`` (3 steps), then ``"chunks"`` once per chunk; may
        raise ``Cancelled``.

    Returns
    -------
    CountResult
        Points, scores and the count of the whole image; ``density`` is None
        (it would be as large as the image); ``meta["chunks"]`` is the number
        of chunks counted.

    Raises
    ------
    ValueError, TypeError
        As ``count_cells``; also a stack (count its planes one by one) and a
        regression counter (it gives no positions to assign to a chunk).

    Examples
    --------
    >>> from skimage.draw import disk
    >>> img = np.zeros((300, 900), np.uint8)
    >>> for c in range(30, 900, 60):
    ...     img[disk((150, c), 8)] = 200
    >>> res = count_large(img, model="classic", diameter=16, core=256)
    >>> res.count, res.meta["chunks"] > 1
    (15, True)
    """
    from .. import __version__
    from ..count import CountResult, count_cells
    from ..count.models import Counter, load_counter

    t0 = time.perf_counter()
    if int(tile) != tile or tile < 64 or tile % 32 or tile > 4096:
        raise ValueError(f"tile must be a multiple of 32 from 64 to 4096, got {tile!r}")
    tile = int(tile)
    overlap = tile // 8 if overlap is None else overlap
    if int(overlap) != overlap or not 0 <= overlap <= tile // 2:
        raise ValueError(f"overlap must be an integer in [0, tile/2 = {tile // 2}], got {overlap!r}")
    overlap = int(overlap)
    if core is not None and (int(core) != core or core < 64):
        raise ValueError(f"core must be a whole number of pixels >= 64, got {core!r}")
    plane = _plane(image, channel, channel_axis)
    if counter is None:
        counter = load_counter(model, device=device)
    elif not isinstance(counter, Counter):
        raise TypeError(f"counter must be a Counter from load_counter, got {type(counter).__name__}")
    if counter.kind == "regression":
        raise ValueError("a regression counter gives one count per window and no positions, so a large image "
                         "cannot be split among chunks; use a density or the classic counter")
    report(progress, "statistics", 0, 3)
    stats = image_statistics(plane, counter, diameter=diameter)
    report(progress, "statistics", 3, 3)
    core_px, halo = _geometry(counter, stats, tile=tile, core=core)
    rows = chunk_plan(plane.shape[0], core=core_px, halo=halo)
    cols = chunk_plan(plane.shape[1], core=core_px, halo=halo)
    # At the model's own scale the chunks take their tiles from the whole plane's layout: same tiles, same
    # blending, same points. Rescaled chunks lay out their own tiles (their pixel grids differ anyway).
    layout = _whole_layout(counter, plane.shape, tile=tile, overlap=overlap) if stats["factor"] == 1.0 else None
    n = len(rows.cores) * len(cols.cores)
    pts_all, sc_all = [], []
    d_arg = stats["diameter"] if stats["diameter"] is not None else None
    meta = {}
    k = 0
    for (r0, r1), (cr0, cr1) in zip(rows.reads, rows.cores):
        for (c0, c1), (cc0, cc1) in zip(cols.reads, cols.cores):
            block = np.asarray(plane[r0:r1, c0:c1])
            res = count_cells(block, counter=counter, diameter=d_arg, tile=tile, overlap=overlap,
                              batch_size=batch_size, percentiles=stats["percentiles"],
                              foreground=stats["foreground"],
                              tile_grid=_chunk_grid(layout, ((r0, r1), (c0, c1)), plane.shape, overlap))
            meta = res.meta
            pts = res.points.reshape(-1, 2) + np.array([r0, c0], float)
            cell = np.floor(pts + 0.5)
            keep = ((cell[:, 0] >= cr0) | (cr0 == 0)) & ((cell[:, 0] < cr1) | (cr1 == plane.shape[0])) & \
                   ((cell[:, 1] >= cc0) | (cc0 == 0)) & ((cell[:, 1] < cc1) | (cc1 == plane.shape[1]))
            pts_all.append(pts[keep])
            sc_all.append(np.asarray(res.scores, float)[keep])
            k += 1
            report(progress, "chunks", k, n)
            del block, res
            _release_memory()
    points = np.concatenate(pts_all) if pts_all else np.zeros((0, 2))
    scores = np.concatenate(sc_all) if sc_all else np.zeros(0)
    order = np.lexsort((points[:, 1], points[:, 0])) if len(points) else np.zeros(0, int)
    points, scores = points[order], scores[order]
    meta = {**meta, "operation": "count", "diameter_used": stats["diameter"],
            "diameter_source": stats["diameter_source"], "scale_factor": stats["factor"],
            "percentiles": stats["percentiles"], "foreground": stats["foreground"], "n_planes": 1,
            "chunks": n, "chunk_core": core_px, "lazy": True, "seconds": round(time.perf_counter() - t0, 3),
            "cellsynth_version": __version__}
    return CountResult(count=int(len(points)), points=points, scores=scores, density=None,
                       per_plane=np.array([float(len(points))]), density_sum=None, meta=meta)


#: Planes with more pixels than this are counted in chunks (:func:`count_large`), never read whole: the one
#: threshold of the CLI's batch counting and the napari docks.
LARGE_PIXELS = 4096 * 4096


def stack_layout(shape) -> tuple[tuple[int, ...], bool]:
    """``(stack shape, colour samples last)`` of an image's shape, by the rule ``split_planes`` applies.

    Examples
    --------
    >>> stack_layout((5, 100, 120)), stack_layout((100, 120, 3)), stack_layout((2, 5, 100, 120))
    (((5,), False), ((), True), ((2, 5), False))
    """
    colour = len(shape) >= 3 and shape[-1] <= 4 and min(shape[-3:-1]) > 4
    spatial = 3 if colour else 2
    return tuple(shape[:-spatial]), colour


def diameter_input(image: Any) -> Any:
    """What a diameter is estimated on: an in-memory image as it is; of a lazy one, the crop the estimate reads.

    For a lazy stack, the crop of its middle plane (as in memory, where the
    middle plane is analysed); only that crop is read.
    """
    if isinstance(image, np.ndarray):
        return image
    lead, colour = stack_layout(image.shape)
    plane = image[tuple(s // 2 for s in lead)] if lead else image
    if colour:
        rows, cols = plane.shape[:2]
        side_r = min(rows, int(np.sqrt(640 * 640 * rows / cols)) + 1)
        side_c = min(cols, 640 * 640 // max(side_r, 1) + 1)
        r0, c0 = (rows - side_r) // 2, (cols - side_c) // 2
        return np.asarray(plane[r0:r0 + side_r, c0:c0 + side_c])
    return _central_crop(plane)


def count_planes(image: Any, *, counter: Any, diameter: Union[float, str, None] = "auto",
                 channel: Optional[int] = None, progress: Optional[ProgressCallback] = None):
    """Count an array-like image or stack that is not in memory (dask, zarr), plane by plane, never loading it whole.

    The diameter is resolved once for the whole stack (``"auto"``: on the middle
    plane's central crop). Planes up to :data:`LARGE_PIXELS` are read one at a
    time and counted with :func:`~cellsynth.count.count_cells`; larger ones with
    :func:`count_large`, chunk by chunk.

    Parameters
    ----------
    image : array-like
        ``(..., M, N)`` or ``(..., M, N, C)`` with ``C <= 4``.
    counter : Counter
    diameter : float, "auto" or None
    channel : int, optional
    progress : ProgressCallback, optional
        Stage ``"estimating the cell diameter"``, then ``"planes"`` once per
        plane (and a large plane's own stages, prefixed with its number).

    Returns
    -------
    CountResult
        Points with the stack coordinates first; ``density`` is None;
        ``meta["lazy"]`` is True.

    Examples
    --------
    >>> import dask.array as da
    >>> from skimage.draw import disk
    >>> from cellsynth.count import load_counter
    >>> img = np.zeros((2, 60, 90), np.uint8)
    >>> for c in (15, 45, 75):
    ...     img[0][disk((30, c), 6)] = 200
    >>> res = count_planes(da.from_array(img), counter=load_counter("classic"), diameter=12)
    >>> res.per_plane.tolist(), res.points.shape[1]
    ([3.0, 0.0], 3)
    """
    from ..count import CountResult, count_cells
    from ..count.infer import resolve_diameter

    if diameter == "auto":
        report(progress, "estimating the cell diameter", 0, 1)
    d, source = resolve_diameter(diameter, lambda: diameter_input(image), channel)
    lead, colour = stack_layout(image.shape)
    indices = list(np.ndindex(*lead)) if lead else [()]
    pts, scores, per, meta = [], [], [], {}
    for k, idx in enumerate(indices):
        plane = image[idx] if idx else image
        rows, cols = plane.shape[:2] if colour else plane.shape[-2:]
        if rows * cols > LARGE_PIXELS:
            res = count_large(plane, counter=counter, diameter=d, channel=channel,
                              progress=lambda p, k=k: report(progress, f"plane {k + 1} of {len(indices)}: "
                                                                       f"{p.stage}", p.step, p.total))
        else:
            res = count_cells(np.asarray(plane), counter=counter, diameter=d, channel=channel)
        meta = res.meta
        p = np.asarray(res.points, float).reshape(-1, 2)
        if idx:
            p = np.concatenate([np.broadcast_to(np.array(idx, float), (len(p), len(idx))), p], axis=1)
        pts.append(p)
        scores.append(np.asarray(res.scores, float))
        per.append(res.count)
        report(progress, "planes", k + 1, len(indices))
    meta = {**meta, "diameter_used": d, "diameter_source": source, "n_planes": len(indices), "lazy": True}
    return CountResult(count=int(round(float(np.sum(per)))),
                       points=np.concatenate(pts) if pts else np.zeros((0, 2 + len(lead))),
                       scores=np.concatenate(scores) if scores else np.zeros(0), density=None,
                       per_plane=np.array(per, float).reshape(lead if lead else (1,)), density_sum=None, meta=meta)
