"""Datasets made item by item on dask.distributed: Syn-HC layouts and their stylization.

The items of a layout dataset (and of its stylized copy) are independent, so
the cluster makes them (each worker generates layouts, or loads the
stylization pipeline and the QC counter once and stylizes images) while the
client, and only it, writes every file and the manifest, item after item in
index order, exactly as the serial export does: the folder a cluster run
writes is the folder the serial run writes, and it resumes, refuses and
overwrites under the same rules (items already written and present are kept;
a folder made with other settings is replaced only with ``overwrite``). Items
finished out of order wait in the client's memory until the ones before them
are written, so a killed run loses at most the few items in flight.
"""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Optional

import numpy as np

from .engine import cluster_client

__all__ = ["run_in_order", "layouts_on_cluster", "StylizeOnCluster"]


def run_in_order(fn: Callable, tasks: Iterable[tuple], *, scheduler: Any = None, workers: Optional[int] = None,
                 threads_per_worker: int = 1, shared: Optional[dict] = None, name: str = "item",
                 client: Any = None) -> Iterator:
    """Yield ``fn(*task, **shared)`` of every task, in the tasks' order, each computed on a dask cluster.

    Parameters
    ----------
    fn : callable
        Importable (a module-level function): workers run it.
    tasks : iterable of tuple
        Positional arguments of each call.
    scheduler, workers, threads_per_worker
        See :func:`~cellsynth.batch.cluster_client` (ignored when ``client`` is given).
    shared : dict, optional
        Keyword arguments common to every call, sent once to every worker.
    client : distributed.Client, optional
        A client already connected (e.g. by :class:`StylizeOnCluster`).

    A task that fails raises its exception here (the results before it have
    been yielded). Closing the generator early cancels what is left.

    Examples
    --------
    >>> from operator import mul
    >>> with cluster_client("local", workers=1) as c:  # doctest: +SKIP
    ...     list(run_in_order(mul, [(2, 3), (4, 5)], client=c))
    [6, 20]
    """
    from distributed import as_completed

    it = iter(tasks)
    first = next(it, None)
    if first is None:  # nothing to do: no cluster starts
        return
    it = itertools.chain([first], it)
    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(cluster_client(scheduler, workers=workers,
                                                        threads_per_worker=threads_per_worker))
        kw = {}
        if shared:
            futs = client.scatter(list(shared.values()), broadcast=True)
            kw = dict(zip(shared, futs))
        run = uuid.uuid4().hex[:8]
        # at most `window` items between the next one to hand back and the last one sent: inputs are read,
        # and results wait, a few at a time
        window = max(8, 4 * len(client.scheduler_info().get("workers", {})))
        pending: dict = {}  # key -> (index, future) of the items sent and not back yet
        ready: dict = {}
        done = as_completed()
        sent = nxt = 0

        def send() -> None:
            nonlocal sent
            while sent - nxt < window:
                task = next(it, None)
                if task is None:
                    return
                fut = client.submit(fn, *tuple(task), **kw, key=f"{name}-{sent}-{run}", pure=False)
                pending[fut.key] = (sent, fut)
                done.add(fut)
                sent += 1

        send()
        try:
            for fut in done:
                ready[pending.pop(fut.key)[0]] = fut.result()
                while nxt in ready:
                    yield ready.pop(nxt)
                    nxt += 1
                send()
        finally:
            for _, fut in pending.values():
                fut.cancel()


# ----------------------------------------------------------------------------- layouts

def _layout(params, seed: int):
    """Worker task: one layout."""
    from ..layouts.generate import generate_layout

    return generate_layout(params, rng=seed)


def layouts_on_cluster(root, indices: Iterable[int], params, seed: int, *, scheduler: Any = None,
                       workers: Optional[int] = None) -> Iterator[dict]:
    """Manifest items of layouts ``indices`` of a dataset, generated on the cluster and written here, in order.

    Used by :func:`cellsynth.layouts.export_dataset` (``scheduler``/``workers``):
    item ``i`` is ``generate_layout(params, rng=item_seed(seed, i))`` written by
    the same functions as the serial export.
    """
    from ..layouts.dataset import _names, _write_layout, item_seed

    indices = list(indices)
    seeds = [item_seed(seed, i) for i in indices]
    made = run_in_order(_layout, [(params, s) for s in seeds], scheduler=scheduler, workers=workers, name="layout")
    with contextlib.closing(made):
        for i, s, lay in zip(indices, seeds, made):
            item = _write_layout(root, i, lay)
            yield {**_names(i), "seed": s, "n_cells": item["n_cells"]}


# ----------------------------------------------------------------------------- stylization

_PIPELINE_ARGS = ("model", "image_encoder", "device", "dtype", "offline", "config", "channels_last", "compile")
_QC: dict = {}


def _qc_counter(model: str):
    """One QC counter per worker process."""
    from ..stylize.dataset import qc_counter

    if model not in _QC:
        _QC.clear()
        _QC[model] = qc_counter(model)
    return _QC[model]


def _pipeline(spec: dict):
    from ..stylize.loading import load_pipeline

    return load_pipeline(**spec)  # kept by load_pipeline's cache: one load per worker process


def _pipeline_name(spec: dict) -> str:
    """Worker task: the name a loaded pipeline records (as the serial run records it)."""
    return str(getattr(_pipeline(spec), "name_or_path", None) or "")


def _stylize_item(image: np.ndarray, params, *, spec: dict, style: np.ndarray, token, qc_model: str,
                  diameter: float) -> tuple:
    """Worker task: ``(stylized image, QC count, counter used)`` of one content image."""
    from ..stylize.dataset import qc_count

    out = _pipeline(spec)(image, style, token, params=params)
    counted, used = qc_count(out.image, diameter=diameter, counter=_qc_counter(qc_model))
    return out.image, counted, used


class StylizeOnCluster:
    """Stylization of a dataset's images on a dask cluster, for :func:`cellsynth.stylize.stylize_dataset`.

    A context manager (it holds the cluster). ``pipeline`` is the keyword
    arguments of :func:`~cellsynth.stylize.load_pipeline` (each worker loads the
    pipeline once); the style image and token are sent once to every worker.

    Raises
    ------
    TypeError
        ``pipeline`` is not a dict of ``load_pipeline`` arguments (a loaded
        pipeline stays in the process that loaded it).
    """

    def __init__(self, pipeline: Any, *, token, style: np.ndarray, qc_model: str, scheduler: Any = None,
                 workers: Optional[int] = None) -> None:
        if not isinstance(pipeline, dict) or "model" not in pipeline:
            raise TypeError("stylizing on a cluster needs the pipeline's load_pipeline arguments (a dict with "
                            "'model', ...), which every worker loads once; a loaded pipeline cannot be sent")
        unknown = set(pipeline) - set(_PIPELINE_ARGS)
        if unknown:
            raise TypeError(f"unknown load_pipeline arguments {sorted(unknown)}; expected some of {_PIPELINE_ARGS}")
        self.spec = {**pipeline, "progress": None}
        self.token, self.style, self.qc_model = token, np.asarray(style), qc_model
        self._cluster = cluster_client(scheduler, workers=workers)
        self.client = None
        self.model_name = ""

    def __enter__(self) -> "StylizeOnCluster":
        from .engine import _accepts_n_workers

        self.client = self._cluster.__enter__()
        try:
            # every worker there now loads the pipeline at once (others load it with their first image)
            info = self.client.scheduler_info(**({"n_workers": -1} if _accepts_n_workers(self.client) else {}))
            futs = [self.client.submit(_pipeline_name, self.spec, workers=[w], allow_other_workers=False, pure=False)
                    for w in info.get("workers", {})] or [self.client.submit(_pipeline_name, self.spec, pure=False)]
            self.model_name = self.client.gather(futs)[0]
        except BaseException:
            self._cluster.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._cluster.__exit__(*exc)

    def results(self, images: Iterable[tuple], diameter: float) -> Iterator[tuple]:
        """``(stylized image, QC count, counter used)`` of each ``(content image, StylizeParams)``, in order."""
        return run_in_order(_stylize_item, images, client=self.client, name="stylize",
                            shared={"spec": self.spec, "style": self.style, "token": self.token,
                                    "qc_model": self.qc_model, "diameter": float(diameter)})
