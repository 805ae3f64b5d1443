"""``count_batch``: count every plane of many images on dask.distributed, resumably.

The client plans the work (one task per plane), the cluster counts (each worker
loads the counter once and reads only its plane), and the client writes every
result as it arrives: one record per plane under ``OUT/.records/`` (written
atomically, so a killed run keeps everything finished), one points CSV per
image once all its planes are in, and at the end the table ``counts.csv`` and
the plot ``counts.png``. A re-run skips every plane whose record is intact and
was made from the same file with the same settings; nothing is replaced
without ``overwrite=True``. A worker lost mid-run costs only its current
task, which the scheduler gives to another worker.

On CPU workers the network runs in onnxruntime: the client makes sure the
counter's ONNX export exists (exporting it once, with torch, when it is not
cached yet) and sends it to every worker, so the workers load the counter from
it without importing torch or timm (seconds saved per worker start).

Layout of ``OUT``::

    batch.json          settings and version (what the records were made with)
    counts.csv          image, plane, stack index, count, diameter, model, seconds ...
    counts.png          counts per image, or per frame for stacks
    points/NAME.csv     row, col[, plane], score (and t/z indices for stacks)
    .records/KEY.json   one per plane
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .._cluster import WORKER_BYTES, accepts_n_workers, local_workers, cluster_client  # noqa: F401
from ..progress import ProgressCallback, report
from .lazy import LARGE_PIXELS
from .results import _Folder, _key, _names, _prepare_plot, _rows, _write_plot, _write_table
from .sources import find_images, open_image

__all__ = ["BatchParams", "BatchResult", "cluster_client", "count_batch", "count_plane"]


@dataclass(frozen=True)
class BatchParams:
    """What to count with; shared by every plane of a batch.

    Parameters
    ----------
    model : str
        ``"default"``, ``"classic"`` or a model path (as in ``count_cells``).
    diameter : float, "auto" or None
        Cell diameter in pixels; ``"auto"`` estimates it for each plane.
    channel : int, optional
        Channel of multichannel images (default: maximum over channels).
    device : str
        Device on the workers (``"auto"``, ``"cpu"``, ``"cuda"``...).
    tile, overlap, batch_size : int
        As in ``count_cells``.
    large_pixels : int
        Planes with more pixels than this are counted lazily in chunks
        (:func:`~cellsynth.batch.count_large`) instead of read whole.
    regions : str, optional
        A regions file (napari's shapes CSV or GeoJSON, see
        :mod:`cellsynth.count.regions`) in every image's pixel coordinates, e.g.
        the quadrants of a well: ``counts.csv`` gets a column ``in <region>`` with
        the cells of each plane in each region.
    measure_channels : tuple of int, optional
        Channels measured within each nucleus (as ``cellsynth count
        --measure-channels``): the records keep each nucleus's means, ``counts.csv``
        gets the nuclei of each marker class per plane (``<class>``, ``<class> %``,
        ``threshold <name>``) and the points CSVs ``mean_<name>`` and ``class``.
    thresholds : tuple of float, optional
        One per measured channel; None or ``"auto"``: Otsu's method on each
        plane's per-nucleus means. Like ``regions``, thresholds and names are
        applied to the records, so changing them recounts nothing.
    marker_names : tuple of str, optional
        Names of the measured channels (default ``ch<C>``).

    Examples
    --------
    >>> BatchParams(diameter=12).diameter
    12.0
    >>> BatchParams(diameter="big")
    Traceback (most recent call last):
    ...
    ValueError: diameter must be a positive number of pixels, 'auto' or None, got 'big'
    """

    model: str = "default"
    diameter: Union[float, str, None] = "auto"
    channel: Optional[int] = None
    device: str = "auto"
    tile: int = 256
    overlap: Optional[int] = None
    batch_size: Optional[int] = None
    large_pixels: int = LARGE_PIXELS
    regions: Optional[str] = None
    measure_channels: Optional[tuple] = None
    thresholds: Optional[tuple] = None
    marker_names: Optional[tuple] = None

    def __post_init__(self) -> None:
        d = self.diameter
        if isinstance(d, str):
            if d != "auto":
                raise ValueError(f"diameter must be a positive number of pixels, 'auto' or None, got {d!r}")
        elif d is not None:
            if isinstance(d, bool) or not (np.isscalar(d) and np.isfinite(d) and d > 0):
                raise ValueError(f"diameter must be a positive number of pixels, 'auto' or None, got {d!r}")
            object.__setattr__(self, "diameter", float(d))
        if self.channel is not None and (isinstance(self.channel, bool) or int(self.channel) != self.channel):
            raise ValueError(f"channel must be a whole number or None, got {self.channel!r}")
        if int(self.tile) != self.tile or self.tile < 64 or self.tile % 32 or self.tile > 4096:
            raise ValueError(f"tile must be a multiple of 32 from 64 to 4096, got {self.tile!r}")
        if self.overlap is not None and (int(self.overlap) != self.overlap or not 0 <= self.overlap <= self.tile // 2):
            raise ValueError(f"overlap must be an integer in [0, tile/2 = {self.tile // 2}], got {self.overlap!r}")
        if self.batch_size is not None and (int(self.batch_size) != self.batch_size or self.batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if int(self.large_pixels) != self.large_pixels or self.large_pixels < 64 * 64:
            raise ValueError(f"large_pixels must be a whole number >= 4096, got {self.large_pixels!r}")
        if self.regions is not None:
            object.__setattr__(self, "regions", str(self.regions))
        from ..count.markers import marker_options

        chans, thresholds, names = marker_options(self.measure_channels, self.thresholds or "auto",
                                                  self.marker_names)
        object.__setattr__(self, "measure_channels", tuple(chans) or None)
        object.__setattr__(self, "thresholds", None if thresholds is None else tuple(thresholds))
        object.__setattr__(self, "marker_names", None if names is None else tuple(names))

    def markers(self) -> Optional[dict]:
        """``{"names", "thresholds"}`` of the measured channels (thresholds None: automatic), or None."""
        if not self.measure_channels:
            return None
        names = list(self.marker_names or (f"ch{c}" for c in self.measure_channels))
        return {"names": names, "thresholds": None if self.thresholds is None else list(self.thresholds)}


@dataclass
class BatchResult:
    """What :func:`count_batch` returns.

    Attributes
    ----------
    rows : list of dict
        The rows of ``counts.csv`` (every plane counted in ``out``, this run or before).
    counted, skipped : int
        Planes counted by this run; planes found done and left alone.
    errors : list of str
        One line per plane that could not be counted (it has no record; a re-run retries it).
    table, plot : Path
        ``counts.csv`` and ``counts.png``.
    seconds : float
        Wall time of this run.
    workers : int
        Workers of the cluster (0 when there was nothing to count).
    """

    rows: list
    counted: int
    skipped: int
    errors: list = field(default_factory=list)
    table: Optional[Path] = None
    plot: Optional[Path] = None
    seconds: float = 0.0
    workers: int = 0


# ----------------------------------------------------------------------------- worker side

_COUNTERS: dict = {}


def _worker_counter(model: str, device: str):
    """One loaded counter per worker process and (model, device, weights file state)."""
    from ..count import load_counter
    from ..weights import resources_dir

    p = resources_dir() / "models" / "counter-default" if model == "default" else Path(model)
    w = p / "model.safetensors" if p.is_dir() else p
    stamp = (w.stat().st_mtime_ns, w.stat().st_size) if w.is_file() else ()
    key = (model, device, stamp)
    if key not in _COUNTERS:
        _COUNTERS.clear()
        _COUNTERS[key] = load_counter(model, device=device)
    return _COUNTERS[key]


def count_plane(path: str, index: tuple, params: BatchParams, export: Optional[tuple] = None) -> dict:
    """Count one plane of one image (the task a worker runs); returns a plain dict.

    Planes over ``params.large_pixels`` pixels go through :func:`count_large`
    and are never read whole. ``export``: ``(key, ONNX bytes)`` of the counter's
    onnxruntime export, made by the client (the worker then needs no torch).

    Examples
    --------
    >>> import tempfile, tifffile
    >>> from skimage.draw import disk
    >>> img = np.zeros((2, 64, 64), np.uint8)
    >>> img[1][disk((20, 20), 6)] = img[1][disk((44, 40), 6)] = 200
    >>> p = Path(tempfile.mkdtemp()) / "s.tif"
    >>> tifffile.imwrite(p, img, imagej=True, metadata={"axes": "TYX"})
    >>> r = count_plane(str(p), (1,), BatchParams(model="classic", diameter=12))
    >>> r["count"], r["points"].shape
    (2, (2, 2))
    """
    from ..count import count_cells
    from .lazy import count_large
    from .sources import open_image, read_small_plane

    small = None if index else read_small_plane(path, params.large_pixels)  # without dask.array when small
    arr, ch = small if small is not None else open_image(path).plane(tuple(index))
    if export is not None:
        from ..count import engines

        engines.install(*export)
    counter = _worker_counter(params.model, params.device)
    t0 = time.perf_counter()  # the counting itself (a worker loads its counter once, on its first plane)
    spatial = arr.shape[:2] if ch is not None else (arr.shape[:2] if arr.ndim == 3 and arr.shape[-1] <= 4
                                                      else arr.shape[-2:])
    kw = dict(counter=counter, diameter=params.diameter, channel=params.channel, channel_axis=ch,
              tile=params.tile, overlap=params.overlap, batch_size=params.batch_size)
    lazy = int(spatial[0]) * int(spatial[1]) > params.large_pixels
    import dask

    # Reads happen here, in this process (a worker's own client would ship the file handles elsewhere).
    with dask.config.set(scheduler="synchronous"):
        res = count_large(arr, **kw) if lazy else count_cells(np.asarray(arr), **kw)
    out = {
        "count": res.count,
        "points": np.asarray(res.points, float).reshape(-1, 2),
        "scores": np.asarray(res.scores, float),
        "diameter": res.meta.get("diameter_used"),
        "diameter_source": res.meta.get("diameter_source"),
        "kind": counter.kind,
        "lazy": lazy,
        "shape": [int(s) for s in spatial],
        "seconds": round(time.perf_counter() - t0, 3),
        "worker": f"{os.uname().nodename}:{os.getpid()}",
    }
    if params.measure_channels:
        out["means"] = np.round(plane_means(arr, ch, params.measure_channels, out["points"],
                                            out["diameter"], path), 4).tolist()
    return out


def plane_means(arr, channel_axis: Optional[int], channels, points: np.ndarray, diameter: Optional[float],
                path: str = "the image", band: int = 2048) -> np.ndarray:
    """Per-nucleus means ``(K, len(channels))`` of a plane (numpy or dask), read in bands of rows.

    The same numbers as :func:`~cellsynth.count.markers.nucleus_means` on the whole
    plane (each band is read with a margin of one radius and the neighbouring
    centres), so a plane too large to read whole is measured too.
    """
    from ..count.markers import nucleus_means

    if channel_axis is None:
        raise ValueError(f"{path} has one channel; measuring channels needs images with several channels")
    n = arr.shape[channel_axis]
    if any(not 0 <= c < n for c in channels):
        raise ValueError(f"{path}: measured channels {list(channels)}, but the image has channels 0..{n - 1}")
    chans = np.moveaxis(arr, channel_axis, 0) if channel_axis != 0 else arr
    d = float(diameter or 15.0)  # as `cellsynth count` measures
    p = np.asarray(points, float).reshape(-1, 2)
    out = np.full((len(p), len(channels)), np.nan)
    r = int(np.ceil(d / 2)) + 1
    rows = chans.shape[1]
    for top in range(0, rows, band):
        mine = (p[:, 0] >= top) & (p[:, 0] < top + band)
        if not mine.any():
            continue
        a, b = max(0, top - r), min(rows, top + band + r)
        near = (p[:, 0] >= a - r) & (p[:, 0] < b + r)  # neighbours share out the pixels between centres
        window = np.asarray(chans[list(channels), a:b])
        means = nucleus_means(window, p[near] - [a, 0], diameter=d)
        out[mine] = means[mine[near]]
    return out


# ----------------------------------------------------------------------------- cluster

class _ClusterInBackground:
    """:func:`cluster_client`, entered in a thread (the cluster starts while the caller plans), closed likewise.

    ``client()`` waits for the client; ``close()`` starts closing (in the thread) and ``join()`` waits for it.
    """

    def __init__(self, scheduler: Any, workers: Optional[int], threads_per_worker: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        # Imported here, in the calling thread, before the other one starts: two threads importing one package
        # at once can meet it half imported (a plan that imported dask.array while the cluster's thread
        # imported distributed, and with it dask, failed with KeyError: 'dask'). Meanwhile the caller loads the
        # counter (scipy, scikit-image, onnxruntime) and reads the files' headers (tifffile; zarr for
        # OME-Zarr); of what the cluster's start imports after these, only the standard library is common.
        import distributed  # noqa: F401
        import distributed.deploy.local  # noqa: F401
        import psutil  # noqa: F401 (also imported by the counter's memory checks)
        import tifffile  # noqa: F401

        self._cm = cluster_client(scheduler, workers=workers, threads_per_worker=threads_per_worker)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cellsynth-cluster")
        self._started = self._pool.submit(self._cm.__enter__)
        self._closed = None

    def client(self):
        return self._started.result()

    def close(self) -> None:
        if self._closed is None:
            self._closed = self._pool.submit(self._exit)

    def _exit(self) -> None:
        try:
            self._started.result()
        except BaseException:  # it never started: nothing to close
            return
        self._cm.__exit__(None, None, None)

    def join(self) -> None:
        self.close()
        try:
            self._closed.result()
        finally:
            self._pool.shutdown(wait=True)


# ----------------------------------------------------------------------------- results folder

def _settings(params: BatchParams) -> tuple:
    """``(settings of the results folder, the counter loaded on the CPU)``: checks the model before any cluster."""
    from ..count import load_counter

    counter = load_counter(params.model, device="cpu")
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(params).items()}  # as JSON reads back
    return {**plain, "model_sha256": counter.sha256, "kind": counter.kind,
            "overlap": params.tile // 8 if params.overlap is None else params.overlap}, counter


def _worker_export(counter, params: BatchParams) -> Optional[tuple]:
    """``(key, ONNX bytes)`` for workers that count on the CPU with onnxruntime, made once here; else None."""
    from ..count import engines

    if counter.kind == "classic" or params.device not in ("auto", "cpu"):
        return None
    if engines.resolve_engine(None, "cpu") != "onnxruntime":
        return None
    return engines.export_bytes(counter)


def count_batch(
    inputs: Any,
    out: Union[str, os.PathLike],
    *,
    params: Optional[BatchParams] = None,
    scheduler: Any = None,
    workers: Optional[int] = None,
    threads_per_worker: int = 1,
    overwrite: bool = False,
    progress: Optional[ProgressCallback] = None,
) -> BatchResult:
    """Count every plane of every image in ``inputs`` on a dask cluster; write tables and a plot to ``out``.

    Parameters
    ----------
    inputs : path-like or list of them
        Files, folders (searched recursively) and glob patterns of TIFF / OME-TIFF,
        OME-Zarr, PNG and JPEG images.
    out : path-like
        Results folder (see the module's description); created when missing.
    params : BatchParams, optional
    scheduler, workers, threads_per_worker
        See :func:`cluster_client`; no cluster starts when everything is done.
    overwrite : bool
        Recount everything and replace earlier results in ``out``. Without it, a
        re-run resumes: done planes are skipped, and results made with other
        settings or from files changed since are refused.
    progress : ProgressCallback, optional
        Stage ``"planes"``, once per plane finished (message: the image name).

    Returns
    -------
    BatchResult

    Raises
    ------
    FileNotFoundError, FileExistsError, ValueError
        No images, an unusable results folder, results that would be replaced.
    """
    t0 = time.perf_counter()
    params = params or BatchParams()
    out = Path(out)
    paths = find_images(list(inputs) if isinstance(inputs, (list, tuple)) else [inputs], skip=out)
    if workers is not None and scheduler in (None, "local"):
        local_workers(workers)  # refused before anything is written
    regions = _read_regions(params.regions)
    folder = _Folder(out)
    with contextlib.ExitStack() as stack:
        cluster = None
        if paths and folder.is_new() and (params.model in ("default", "classic") or Path(params.model).exists()):
            # all is work (a mistyped model is refused first): the cluster starts while the counter loads and
            # the plan is made
            cluster = _ClusterInBackground(scheduler, workers, threads_per_worker)
            stack.callback(cluster.join)
        settings, counter = _settings(params)
        folder.check(settings, overwrite)
        if cluster is None and paths and (overwrite or not folder.has_records()):
            cluster = _ClusterInBackground(scheduler, workers, threads_per_worker)
            stack.callback(cluster.join)
        return _count_batch(paths, out, params, settings, counter, folder, cluster, stack, scheduler=scheduler,
                            workers=workers, threads_per_worker=threads_per_worker, overwrite=overwrite,
                            progress=progress, t0=t0, regions=regions)


def _read_regions(path: Optional[str]):
    """The regions of ``params.regions`` (read before any work), or None."""
    if path is None:
        return None
    from ..count.regions import read_regions

    regions = read_regions(path)
    if not regions:
        raise ValueError(f"{path} holds no regions (rectangles, ellipses or polygons)")
    return regions


def _plan(paths, folder, out, overwrite: bool):
    """``(images, errors, planes to count, planes done, planes per image, records per image)``.

    An unreadable file is reported and the others are counted; a file changed
    since its planes were counted into ``out`` is refused (unless ``overwrite``).
    """
    images, errors = {}, []
    for p in paths:
        try:
            images[p.resolve()] = open_image(p)
        except (ValueError, OSError) as exc:
            errors.append(str(exc))
    todo, skipped, expected, have = [], 0, {}, {}
    for r, img in images.items():
        fp = img.fingerprint()
        expected[r], have[r] = img.n_planes, []
        for flat, index in enumerate(img.plane_indices()):
            key = _key(r, index)
            rec = None if overwrite else folder.record(key)
            if rec is not None and rec["fingerprint"] != fp:
                raise FileExistsError(f"{r} changed since it was counted into {out}; pass overwrite=True to recount, "
                                      "or choose another --out folder")
            if rec is not None:
                skipped += 1
                have[r].append(rec)
                continue
            todo.append((key, r, flat, index, fp))
    return images, errors, todo, skipped, expected, have


def _count_batch(paths, out, params, settings, counter, folder, cluster, stack, *, scheduler, workers,
                 threads_per_worker, overwrite, progress, t0, regions=None) -> BatchResult:
    """The body of :func:`count_batch`: plan, count on ``cluster`` (started when None), write the results."""

    # 1. plan: one task per plane not done yet
    images, errors, todo, skipped, expected, have = _plan(paths, folder, out, overwrite)
    names = _names(paths)
    folder.start(settings, overwrite)

    # 2. count on the cluster, recording each plane as it arrives
    n_workers = n_new = 0

    def finish_image(r: Path, again: bool = False) -> None:
        recs = sorted(have[r], key=lambda x: x["plane"])
        if len(recs) == expected[r]:
            target = folder.points / f"{recs[0]['name']}.csv"
            if overwrite or again or not target.exists():
                folder.write_points(recs[0]["name"], recs, recs[0].get("axes", ""), overwrite=True,
                                    markers=params.markers())

    if todo and cluster is None:
        cluster = _ClusterInBackground(scheduler, workers, threads_per_worker)
        stack.callback(cluster.join)
    if not todo and cluster is not None:
        cluster.close()
    if todo:
        export = _worker_export(counter, params)  # while the cluster starts
        client = cluster.client()
        n_workers = len(client.scheduler_info(n_workers=-1).get("workers", {})) \
            if accepts_n_workers(client) else len(client.scheduler_info().get("workers", {}))
        from distributed import as_completed

        if export is not None:  # one copy per worker, sent once
            export = client.scatter([export], broadcast=True)[0]
        futures = {}
        for key, r, flat, index, fp in todo:
            f = client.submit(count_plane, str(r), index, params, export, key=f"count-plane-{key}", pure=False)
            futures[f] = (key, r, flat, index, fp)
        total = len(todo)
        k, plot_ready = 0, False
        try:
            for fut in as_completed(list(futures)):
                key, r, flat, index, fp = futures[fut]
                k += 1
                try:
                    res = fut.result()
                except Exception as exc:  # the plane failed on the worker; the others go on
                    errors.append(f"{r}{' plane ' + str(index) if index else ''}: {exc}")
                    report(progress, "planes", k, total, f"error: {r.name}")
                    continue
                img = images[r]
                rec = {"source": str(r), "name": names[r], "index": list(index), "plane": flat,
                       "axes": img.stack_axes, "fingerprint": fp, "model": settings["model"],
                       "model_sha256": settings["model_sha256"], **res,
                       "points": np.round(res["points"], 4).tolist(),
                       "scores": np.round(res["scores"], 5).tolist()}
                folder.write_record(key, rec)
                n_new += 1
                have[r].append(rec)
                if len(have[r]) == expected[r]:
                    finish_image(r)
                report(progress, "planes", k, total, r.name)
                if total - k < max(1, n_workers) and not plot_ready:  # a core is idle from now on
                    plot_ready = _prepare_plot()
        finally:
            for fut in futures:
                fut.cancel()
            cluster.close()  # closes while the table and the plot are written

    # 3. points files of images completed earlier, the table and the plot
    for r in have:  # marker classes follow this run's thresholds and names: their points files are redone
        if params.markers() is not None or not (folder.points / f"{names[r]}.csv").exists():
            finish_image(r, again=True)
    rows = _rows(folder.all_records(), regions, params.markers())
    table = _write_table(folder.table, rows)
    from .._provenance import record, write_sidecar

    write_sidecar(table, record("count-batch", inputs=sorted({r["image"] for r in rows}) + (
        [params.regions] if params.regions else []), model=counter.describe(), parameters=settings,
        result={"planes": len(rows), "counted_now": n_new, "errors": errors}), overwrite=True)
    plot = _write_plot(folder.plot, rows) if rows else None
    return BatchResult(rows=rows, counted=n_new, skipped=skipped, errors=errors, table=table,
                       plot=plot, seconds=round(time.perf_counter() - t0, 3), workers=n_workers)
