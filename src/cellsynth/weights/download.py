"""Downloads of registry models from the Hugging Face hub, with byte progress and a quick failure offline.

:func:`download` (re-exported by :mod:`cellsynth.weights`) fetches a registry
model's pinned snapshot into the hub cache. One request first asks the hub for
the size of the missing files, so an unreachable hub fails within seconds
instead of after the hub library's retries; byte progress goes to a
:class:`~cellsynth.progress.ProgressCallback`. huggingface_hub and tqdm are
imported inside the functions; the registry and its helpers come from
:mod:`cellsynth.weights.registry`.
"""

from __future__ import annotations

import fnmatch
import io
import os
from pathlib import Path
from typing import Optional

from .._memory import first_line
from ..progress import Cancelled, ProgressCallback, report
from .registry import (ModelSpec, _cache_dir, _cached_snapshot, _missing_files, _not_found,
                       _registry_spec, human_size)

__all__ = ["HUB_TIMEOUT", "download"]


#: Seconds the hub gets to answer before :func:`download` says it cannot be reached.
HUB_TIMEOUT = 10.0


def _bytes_to_fetch(spec: ModelSpec, cached: Optional[Path], timeout: float) -> Optional[int]:
    """Bytes of `spec`'s files not yet in the cache, asked of the hub in one request (no retries).

    None when the hub does not say (or offline mode of the hub library is on: the
    download then gives its own error). Raises ``WeightsNotFoundError`` at once when
    the hub cannot be reached, instead of the download's retries.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled


    try:
        info = HfApi().model_info(spec.repo_id, revision=spec.revision, files_metadata=True, timeout=timeout)
    except OfflineModeIsEnabled:
        return None
    except HfHubHTTPError as err:
        raise _not_found(spec, f"the hub refused the request ({first_line(err, 160)}).") from err
    except (AttributeError, NameError, TypeError):  # a programming error, not the network
        raise
    except Exception as err:  # the HTTP client's transport errors (no network, DNS, proxy, timeout)
        host = constants.ENDPOINT.split("://")[-1]
        raise _not_found(spec, f"{host} cannot be reached ({first_line(err, 160) or type(err).__name__}).") from err
    sizes = []
    for sibling in info.siblings or []:
        if not any(fnmatch.fnmatchcase(sibling.rfilename, pat) for pat in spec.files):
            continue
        if cached is not None and (cached / sibling.rfilename).is_file():
            continue
        sizes.append(sibling.size)
    if not sizes or any(size is None for size in sizes):
        return None
    return int(sum(sizes))


def download(
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: ProgressCallback | None = None,
    timeout: float = HUB_TIMEOUT,
) -> Path:
    """Download a registry model's pinned snapshot into the hub cache, with byte progress.

    Asks no question (a person who pressed a Download button has answered it;
    :func:`~cellsynth.weights.resolve` asks first). One request asks the hub for the size of the
    files still missing; when the hub cannot be reached the error comes at once,
    without the hub library's retries.

    Parameters
    ----------
    name : str
        A key of :data:`~cellsynth.weights.REGISTRY` with a hub repository.
    cache_dir : str or os.PathLike, optional
        As for :func:`~cellsynth.weights.resolve`.
    progress : ProgressCallback, optional
        Receives byte progress, stage ``"download <name>"`` (total: the bytes
        still missing when the hub says). It may raise
        :class:`~cellsynth.progress.Cancelled`, which propagates; files already
        complete stay in the cache, and a later download continues from them.
    timeout : float
        Seconds the hub gets to answer the first request.

    Returns
    -------
    Path
        The snapshot folder in the hub cache.

    Raises
    ------
    ValueError
        If `name` is not a registry model downloadable from the hub.
    cellsynth.weights.WeightsNotFoundError
        If the hub cannot be reached, refuses, or the download fails; the first
        line of the message says why.
    """

    spec = _registry_spec(name)
    if spec.bundled is not None:
        raise ValueError(f"model {spec.name!r} is shipped with cellsynth; there is nothing to download")
    cache_dir = _cache_dir(cache_dir)
    return _download(spec, cache_dir, _cached_snapshot(spec, cache_dir), progress, timeout)


def _download(spec: ModelSpec, cache_dir, cached: Optional[Path], progress, timeout: float) -> Path:
    from huggingface_hub import snapshot_download


    stage = f"download {spec.name}"
    total = _bytes_to_fetch(spec, cached, timeout)
    if total:
        report(progress, stage, 0, total, f"{stage}: {human_size(total)} to fetch")
    tqdm_class = None if progress is None else _progress_tqdm(progress, stage, total)
    hub_args = dict(revision=spec.revision, allow_patterns=list(spec.files), cache_dir=cache_dir)
    try:
        folder = Path(snapshot_download(spec.repo_id, tqdm_class=tqdm_class, **hub_args))
    except Cancelled:
        raise
    except Exception as err:  # hub errors are OSError; its HTTP client's transport errors are not
        raise _not_found(spec, f"the download failed ({type(err).__name__}: {first_line(err, 160)}).") from err
    missing = _missing_files(folder, spec.files)
    if missing:
        raise _not_found(spec, f"the hub snapshot at {folder} lacks {', '.join(missing)}.")
    return folder


def _progress_tqdm(progress: ProgressCallback, stage: str, known_total: Optional[int] = None) -> type:
    """A tqdm class for ``snapshot_download`` that forwards byte counts to `progress`.

    The hub opens several bars; the first one counting bytes (the snapshot's
    overall counter) is forwarded, the others (files done, per-stage counters)
    are ignored so that a progress bar does not jump between counters. Nothing
    is printed. Events follow tqdm's refresh rate (about ten per second).
    The hub's byte counter grows its total as each file starts; `known_total`
    (the bytes to fetch, asked of the hub beforehand) keeps the bar's total fixed.
    """
    from tqdm.std import tqdm


    forwarded: list = []

    class _ProgressTqdm(tqdm):
        # tqdm calls display() while holding its global lock, and refresh() does not
        # release that lock if display() raises. So display() only records a
        # Cancelled (or any error) from the callback; refresh() re-raises it once
        # the lock is released. Otherwise every later progress bar of the process,
        # in any thread, would wait forever.
        def __init__(self, *args, **kwargs):
            self._pending = None
            kwargs.update(disable=False, file=io.StringIO())
            super().__init__(*args, **kwargs)

        def display(self, msg=None, pos=None):
            if self.unit == "B" and not forwarded:
                forwarded.append(self)
            if forwarded and forwarded[0] is self and self._pending is None:
                total = max(int(self.total or 0), int(known_total or 0)) or None
                done = f"{human_size(self.n)} of {human_size(total)}" if total else human_size(self.n)
                try:
                    report(progress, stage, int(self.n), total, f"{stage}: {done}")
                except BaseException as exc:  # re-raised by refresh(), outside the lock
                    self._pending = exc
            return True

        def refresh(self, nolock=False, lock_args=None):
            out = super().refresh(nolock=nolock, lock_args=lock_args)
            if self._pending is not None:
                exc, self._pending = self._pending, None
                raise exc
            return out

    return _ProgressTqdm
