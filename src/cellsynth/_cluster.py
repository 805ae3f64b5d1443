"""Running work on dask.distributed: a client for a local or remote cluster, and tasks run in order.

The bottom of the scale-out: :mod:`cellsynth.batch` (count-batch, large images) and
the dataset writers of :mod:`cellsynth.layouts` and :mod:`cellsynth.stylize`
(``scheduler=``/``workers=``) start their clusters and run their own worker tasks
with these. dask and distributed are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Optional

__all__ = ["cluster_client", "run_in_order", "WORKER_BYTES"]


#: The least memory a local worker process takes with a counter loaded (interpreter, numpy/scipy, onnxruntime).
WORKER_BYTES = 0.5e9


def local_workers(requested: Optional[int]) -> int:
    import psutil

    if requested is not None:
        if int(requested) != requested or requested < 1:
            raise ValueError(f"workers must be a positive whole number, got {requested!r}")
        cores = os.cpu_count() or 1
        free = psutil.virtual_memory().available
        most = max(1, min(4 * cores, int(free // WORKER_BYTES)))
        if requested > most:
            raise ValueError(f"workers={int(requested)} is more than this machine can run: {cores} cores and "
                             f"{free / 1e9:.1f} GB free (a worker process takes about {WORKER_BYTES / 1e9:.1f} GB); "
                             f"use at most {most} (one per core is fastest)")
        return int(requested)
    # One process per core, each holding a counter (about 1.5 GB with a large image's chunk).
    by_memory = int(psutil.virtual_memory().available // 1.5e9)
    return max(1, min(os.cpu_count() or 1, by_memory))


#: How often a local cluster's bookkeeping wakes up (distributed's defaults: 20 ms, 500 ms, 100 ms and 100 ms).
#: With the defaults an idle 2-worker cluster takes ~14 % of one core (the client process, which holds the
#: scheduler and the nannies, 8 %; each worker 3 %), taken from the counting; with these 3-4 %.
_LOCAL_INTERVALS = {"distributed.admin.tick.interval": "200ms", "distributed.admin.system-monitor.interval": "2s",
                    "distributed.worker.memory.monitor-interval": "500ms",
                    "distributed.scheduler.work-stealing-interval": "500ms"}

#: Tasks a local worker holds per thread: one. distributed's 1.1 gives a one-thread worker a second task to
#: wait behind the first, so at the end of a batch one worker can still hold two planes while the other has
#: none (until work stealing moves one).
_LOCAL_SATURATION = {"distributed.scheduler.worker-saturation": 1.0}


@contextlib.contextmanager
def cluster_client(scheduler: Any = None, *, workers: Optional[int] = None, threads_per_worker: int = 1):
    """A dask.distributed ``Client``: a new ``LocalCluster`` of processes, or one connected to ``scheduler``.

    Parameters
    ----------
    scheduler : None, "local", str or Client
        None or ``"local"``: a ``LocalCluster`` of ``workers`` processes, each with
        ``threads_per_worker`` threads (and as many torch/BLAS threads), closed on
        exit. A string: the address of a running scheduler (``tcp://host:8786``,
        e.g. of a dask-jobqueue cluster). A ``Client``: used as it is.
    workers : int, optional
        Local workers (default: one per core, as many as memory allows).

    Raises
    ------
    ValueError
        ``workers`` with a scheduler address, or a scheduler that cannot be reached.
    """
    import dask
    from distributed import Client, LocalCluster

    if isinstance(scheduler, Client):
        yield scheduler
        return
    if scheduler in (None, "local"):
        n = local_workers(workers)
        threads = int(threads_per_worker)
        env = {k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        # dask's nannies set MALLOC_TRIM_THRESHOLD_=65536 in their workers, which fixes glibc's mmap threshold
        # at 128 kB: every array of a count is then mapped and unmapped anew (0.67 -> 1.14 s per 512x512
        # image here). The workers keep glibc's default, as the serial process does. Nor do they sample their
        # own stacks every 10 ms for the dashboard's profile (~8 % of a count). Only critical log records are
        # printed: the callers report failed tasks themselves, and a worker's heartbeat that meets the
        # scheduler closing would print an ERROR with a traceback at the end of a good run.
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
                              "distributed.worker.profile.enabled": False, **_LOCAL_INTERVALS,
                              **_LOCAL_SATURATION}):
            cluster = LocalCluster(n_workers=n, threads_per_worker=threads, processes=True, dashboard_address=":0",
                                   silence_logs=logging.CRITICAL, env=env)
        try:
            client = Client(cluster)
            try:
                yield client
            finally:
                client.close()
        finally:
            cluster.close()
        return
    if workers is not None:
        raise ValueError("workers applies to the local cluster; with a scheduler address, size the cluster "
                         "where it runs (e.g. cluster.scale(N) with dask-jobqueue)")
    try:
        client = Client(str(scheduler), timeout="30s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise ValueError(f"could not connect to the dask scheduler at {scheduler!r}: {exc}; expected 'local' or "
                         "the address of a running scheduler, e.g. tcp://host:8786") from None
    try:
        yield client
    finally:
        client.close()


def accepts_n_workers(client) -> bool:
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters


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


def cluster_args(scheduler, workers) -> dict:
    """``scheduler``/``workers`` keywords of a dask run from command-line values, or none (run in this process).

    Examples
    --------
    >>> cluster_args(None, None), cluster_args(None, 2), cluster_args("tcp://h:8786", None)
    ({}, {'scheduler': 'local', 'workers': 2}, {'scheduler': 'tcp://h:8786', 'workers': None})
    >>> cluster_args("tcp://h:8786", 2)
    Traceback (most recent call last):
    ...
    ValueError: --workers applies to a local cluster; size a remote cluster where it runs
    """
    if workers is not None and (isinstance(workers, bool) or int(workers) != workers or workers < 1):
        raise ValueError(f"--workers must be a whole number >= 1, got {workers!r}")
    if workers is not None and scheduler not in (None, "local"):
        raise ValueError("--workers applies to a local cluster; size a remote cluster where it runs")
    if workers is not None:
        local_workers(workers)  # more than the machine can run is refused before anything is written
    return {} if scheduler is None and workers is None else {"scheduler": scheduler or "local", "workers": workers}
