"""One registry of pretrained model specs and one resolver for their files.

:func:`resolve` turns a registry name or a local path into a folder on disk:
an explicit local path first, then weights shipped in ``resources/``, then the
Hugging Face hub cache, then a download with progress. Offline, a missing model
raises :class:`WeightsNotFoundError` that says how to provide the files.

:func:`check` says where a model's files are without any network access (for a
status line); :func:`download` (from :mod:`cellsynth.weights.download`) fetches a
registry model's pinned snapshot with byte progress, failing within seconds when
the hub cannot be reached.

The registry itself (:data:`REGISTRY`, :class:`ModelSpec`) is in
:mod:`cellsynth.weights.registry`. huggingface_hub is imported inside the
functions that need it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..progress import ProgressCallback
from .download import HUB_TIMEOUT, _download, download
from .registry import (REGISTRY, ModelSpec, WeightsNotFoundError, _cache_dir, _cached_snapshot, _missing_files,
                       _not_found, offline_from_env, _registry_spec, file_sha256, human_size,
                       resources_dir)

__all__ = [
    "REGISTRY", "ModelSpec", "WeightsNotFoundError", "WeightsStatus", "check", "download", "file_sha256",
    "human_size", "resolve", "resources_dir", "sd_v1_config_dir",
]


def resolve(
    name_or_path: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """Find a model's files on disk, downloading them when allowed.

    Order: (1) an existing local path (a folder named like a registry model must
    hold that model's files); (2) weights bundled in :func:`resources_dir`;
    (3) the Hugging Face hub cache at the pinned revision; (4) offline: raise;
    (5) download the pinned snapshot, reporting byte progress.

    Parameters
    ----------
    name_or_path : str or os.PathLike
        A key of :data:`REGISTRY`, or a path to a folder or file.
    cache_dir : str or os.PathLike, optional
        Hub cache folder; when omitted, the ``cache_dir`` setting
        (:mod:`cellsynth.settings`), else the hub's default (``HF_HUB_CACHE``).
    offline : bool, optional
        Never touch the network. Defaults to the ``HF_HUB_OFFLINE`` environment variable.
    progress : ProgressCallback, optional
        Receives download progress in bytes, stage ``"download <name>"``. It may
        raise :class:`~cellsynth.progress.Cancelled`, which propagates.

    Returns
    -------
    Path
        The local folder (or file) holding the model.

    Raises
    ------
    ValueError
        If `name_or_path` is neither an existing path nor a registry name.
    WeightsNotFoundError
        If the files are missing and cannot be downloaded (offline, the hub out of
        reach, or a network error, chained as ``__cause__``), or a local folder
        lacks expected files.

    Examples
    --------
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> resolve(folder) == Path(folder).resolve()
    True
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        spec = REGISTRY.get(path.name)
        if path.is_dir() and spec is not None:
            missing = _missing_files(path, spec.files)
            if missing:
                raise _not_found(spec, f"the folder {str(path)!r} lacks {', '.join(missing)}.")
        return path.resolve()

    spec = _registry_spec(name_or_path)
    if spec.bundled is not None:
        return _bundled(spec)

    cached = _cached_snapshot(spec, cache_dir)
    if cached is not None and not _missing_files(cached, spec.files):
        return cached

    env_offline = offline_from_env()
    if offline is None:
        offline = env_offline
    if offline:
        raise _not_found(spec, "offline mode is on and the hub cache does not hold them.",
                         offline="env" if env_offline else "arg")
    from ..settings import confirm_download

    if not confirm_download(f"{spec.description}: {spec.repo_id}, about {spec.size_mb:g} MB"):
        raise _not_found(spec, "the download was declined (set download_without_asking to download without "
                               "a question).")
    return _download(spec, _cache_dir(cache_dir), cached, progress, HUB_TIMEOUT)



def _bundled(spec: ModelSpec) -> Path:
    bundled = resources_dir() / spec.bundled
    if not bundled.exists():
        raise WeightsNotFoundError(
            f"bundled weights for model {spec.name!r} are missing at {bundled}; "
            "the installation is incomplete, reinstall cellsynth"
        )
    missing = _missing_files(bundled, spec.files) if bundled.is_dir() else []
    if missing:
        raise WeightsNotFoundError(
            f"bundled weights for model {spec.name!r} at {bundled} lack {', '.join(missing)}"
        )
    return bundled

@dataclass(frozen=True)
class WeightsStatus:
    """Where a model's files are, as :func:`check` found them (no network involved).

    Attributes
    ----------
    requested : str
        The model argument checked (registry name or path).
    available : bool
        The files are on this computer.
    where : str
        ``"folder"``, ``"file"``, ``"bundled"``, ``"hub cache"``; ``""`` when not available.
    path : Path or None
        The folder or file holding the model, when available.
    spec : ModelSpec or None
        The registry entry, for a registry name (or a folder named like one).
    problem : str
        One sentence saying what is missing; ``""`` when available.
    """

    requested: str
    available: bool
    where: str = ""
    path: Optional[Path] = None
    spec: Optional[ModelSpec] = None
    problem: str = ""

    @property
    def downloadable(self) -> bool:
        """Missing, and a registry model that :func:`download` can fetch."""
        return not self.available and self.spec is not None and self.spec.bundled is None \
            and not Path(self.requested).expanduser().exists()

    @property
    def size_bytes(self) -> int:
        """Approximate download size of the registry model (0 when not a registry model)."""
        return int(self.spec.size_mb * 1e6) if self.spec is not None else 0


def check(name_or_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> WeightsStatus:
    """Where a model's files are, looked up on this computer only (never the network, never raises).

    The same order as :func:`resolve`: an existing path, bundled weights, the hub
    cache at the pinned revision. Fast enough for a status line (no file is read).

    Examples
    --------
    >>> import tempfile
    >>> check(tempfile.mkdtemp()).where
    'folder'
    >>> status = check("no-such-model")
    >>> status.available, status.problem
    (False, "unknown model 'no-such-model': not an existing path and not one of clip-vit-large-patch14, \
dino-vits8, dinov2-small, efficientnet_b0-imagenet, sd-v1-4")
    """
    text = os.fspath(name_or_path).strip()
    if not text:
        return WeightsStatus(text, False, problem="no model given")
    path = Path(text).expanduser()
    if path.exists():
        spec = REGISTRY.get(path.name)
        if path.is_dir():
            missing = _missing_files(path, spec.files) if spec is not None else []
            if missing:
                return WeightsStatus(text, False, spec=spec, problem=f"the folder {path.name!r} lacks "
                                     f"{', '.join(missing)}")
            return WeightsStatus(text, True, "folder", path.resolve(), spec)
        return WeightsStatus(text, True, "file", path.resolve(), spec)
    try:
        spec = _registry_spec(text)
    except ValueError as err:
        return WeightsStatus(text, False, problem=str(err))
    if spec.bundled is not None:
        try:
            return WeightsStatus(text, True, "bundled", _bundled(spec), spec)
        except WeightsNotFoundError as err:
            return WeightsStatus(text, False, spec=spec, problem=str(err))
    cached = _cached_snapshot(spec, cache_dir)
    if cached is not None and not _missing_files(cached, spec.files):
        return WeightsStatus(text, True, "hub cache", cached, spec)
    return WeightsStatus(text, False, spec=spec,
                         problem=f"{spec.name} is not on this computer (about {human_size(spec.size_mb * 1e6)})")


def sd_v1_config_dir() -> Path:
    """The Stable Diffusion v1.4 configs shipped with the package (a diffusers folder without weights).

    Single-file checkpoints (``sd-v1-4.ckpt``, ``.safetensors``) carry weights
    only; these configs (``model_index.json``, ``unet``, ``vae``, ``text_encoder``,
    ``scheduler``, copied from the ``sd-v1-4`` registry revision) build the
    models without any download.

    Examples
    --------
    >>> sorted(p.name for p in sd_v1_config_dir().iterdir())
    ['model_index.json', 'scheduler', 'text_encoder', 'unet', 'vae']
    """
    return resources_dir() / "configs" / "sd-v1-4"
