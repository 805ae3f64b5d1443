"""One registry of pretrained model specs and one resolver for their files.

:func:`resolve` turns a registry name or a local path into a folder on disk:
an explicit local path first, then weights shipped in ``resources/``, then the
Hugging Face hub cache, then a download with progress. Offline, a missing model
raises :class:`WeightsNotFoundError` that says how to provide the files.

:func:`check` says where a model's files are without any network access (for a
status line); :func:`download` (from :mod:`cellsynth._hub_download`) fetches a
registry model's pinned snapshot with byte progress, failing within seconds when
the hub cannot be reached.

huggingface_hub is imported inside the functions that need it.

Examples
--------
>>> sorted(REGISTRY)
['clip-vit-large-patch14', 'dino-vits8', 'dinov2-small', 'efficientnet_b0-imagenet', 'sd-v1-4']
>>> spec = REGISTRY["dinov2-small"]
>>> spec.repo_id, spec.licence
('facebook/dinov2-small', 'apache-2.0')
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cellsynth.progress import ProgressCallback

from ._hub_download import HUB_TIMEOUT, _download, download

__all__ = [
    "REGISTRY", "ModelSpec", "WeightsNotFoundError", "WeightsStatus", "check", "download", "file_sha256",
    "human_size", "resolve", "resources_dir", "sd_v1_config_dir",
]

_TRUE_VALUES = {"1", "on", "yes", "true"}


class WeightsNotFoundError(FileNotFoundError):
    """Model files are neither on disk nor downloadable; the message says how to provide them.

    The first line of the message says what is missing and why, in a sentence; the
    lines after it (expected files, how to provide them) are details. ``reason``
    is the why alone (e.g. ``"huggingface.co cannot be reached (…)."``), for a
    display that already names the model.
    """

    def __init__(self, message: str = "", *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or (message.splitlines()[0] if message else "")


@dataclass(frozen=True)
class ModelSpec:
    """Where a pretrained model's files come from.

    Parameters
    ----------
    name : str
        Registry key, e.g. ``"dinov2-small"``.
    repo_id : str
        Hugging Face hub id ``"org/name"``; may be empty for bundled weights.
    revision : str
        Pinned 40-hex commit of the hub repository (a branch name only where no
        commit has been verified); may be empty for bundled weights.
    files : tuple of str
        Files expected in the snapshot, relative to its root; glob patterns allowed.
    licence : str
        Licence identifier of the weights.
    size_mb : float
        Approximate download size in MB.
    description : str
        One line for people.
    bundled : str or None, optional
        Path relative to :func:`resources_dir` of weights shipped with the package;
        such a model resolves without any hub.
    """

    name: str
    repo_id: str
    revision: str
    files: tuple[str, ...]
    licence: str
    size_mb: float
    description: str
    bundled: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("ModelSpec.name must not be empty")
        if isinstance(self.files, str) or not self.files:
            raise ValueError(f"ModelSpec.files must be a non-empty tuple, got {self.files!r}")
        object.__setattr__(self, "files", tuple(self.files))
        if self.bundled is None and ("/" not in self.repo_id or not self.revision):
            raise ValueError(
                f"model {self.name!r} needs a hub repo_id 'org/name' and a revision, "
                f"or a bundled path; got repo_id={self.repo_id!r}, revision={self.revision!r}"
            )
        if self.size_mb < 0:
            raise ValueError(f"ModelSpec.size_mb must be >= 0, got {self.size_mb}")


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="sd-v1-4",
            repo_id="CompVis/stable-diffusion-v1-4",
            revision="133a221b8aa7292a167afc5127cb63fb5005638b",
            files=(
                "model_index.json", "scheduler/*", "tokenizer/*",
                "text_encoder/config.json", "text_encoder/model.safetensors",
                "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
            ),
            licence="creativeml-openrail-m",
            size_mb=4270,
            description="Stable Diffusion v1.4 (diffusers layout, float32) for InST",
        ),
        ModelSpec(
            name="clip-vit-large-patch14",
            repo_id="openai/clip-vit-large-patch14",
            revision="32bd64288804d66eefd0ccbe215aa642df71cc41",
            files=(
                "config.json", "model.safetensors", "preprocessor_config.json",
                "merges.txt", "special_tokens_map.json", "tokenizer.json",
                "tokenizer_config.json", "vocab.json",
            ),
            licence="mit",
            size_mb=1710,
            description="OpenAI CLIP ViT-L/14 image encoder for InST style embeddings",
        ),
        ModelSpec(
            name="dinov2-small",
            repo_id="facebook/dinov2-small",
            revision="ed25f3a31f01632728cabb09d1542f84ab7b0056",
            files=("config.json", "model.safetensors", "preprocessor_config.json"),
            licence="apache-2.0",
            size_mb=88,
            description="DINOv2 ViT-S/14 patch features for NSC masks",
        ),
        ModelSpec(
            name="efficientnet_b0-imagenet",
            repo_id="timm/efficientnet_b0.ra_in1k",
            revision="main",
            files=("config.json", "model.safetensors"),
            licence="apache-2.0",
            size_mb=21,
            description="EfficientNet-B0 ImageNet-1k weights (timm) to initialise counters, as in the paper "
                        "(revision: the main branch, no commit verified, unverified pin)",
        ),
        ModelSpec(
            name="dino-vits8",
            repo_id="timm/vit_small_patch8_224.dino",
            revision="main",
            files=("config.json", "model.safetensors"),
            licence="apache-2.0",
            size_mb=87,
            description="DINO ViT-S/8 (timm) patch features, as in the public NSC code "
                        "(revision: the main branch; no commit of it could be verified, unverified pin)",
        ),
    )
}


def resources_dir() -> Path:
    """The folder of data shipped with the package (``resources/`` in the source tree).

    A wheel carries it as ``cellsynth/_resources``; a source checkout has it at
    the repository root.

    Examples
    --------
    >>> resources_dir().name in {"resources", "_resources"}
    True
    """
    packaged = Path(__file__).parent / "_resources"
    if packaged.exists():
        return packaged.resolve()
    return Path(__file__).resolve().parents[2] / "resources"


def file_sha256(path: str | os.PathLike, *, chunk_size: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in chunks (for provenance records).

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "x.bin"
    >>> _ = path.write_bytes(b"abc")
    >>> file_sha256(path)
    'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _missing_files(folder: Path, patterns: Iterable[str]) -> list[str]:
    """The patterns that match no file under `folder`."""
    present = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return [pat for pat in patterns if not any(fnmatch.fnmatchcase(f, pat) for f in present)]


def human_size(nbytes: float) -> str:
    """A byte count for people.

    Examples
    --------
    >>> human_size(4270e6), human_size(88e6), human_size(5000)
    ('4.3 GB', '88 MB', '5 kB')
    """
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.1f} {unit}" if unit == "GB" else f"{value:.0f} {unit}"
    return f"{int(nbytes)} B"


def _first_line(err: BaseException, limit: int = 160) -> str:
    text = (str(err).strip().splitlines() or [""])[0].strip()
    text = text.removeprefix("Got: ")
    return text[:limit] + ("…" if len(text) > limit else "")


def _not_found(spec: ModelSpec, reason: str, *, offline: str = "") -> WeightsNotFoundError:
    """The error for missing weights: one sentence first, then the details.

    `offline` is ``"env"`` when ``HF_HUB_OFFLINE`` turned downloads off, ``"arg"``
    when the caller did (``offline=True``); only then does the message say how to
    allow downloads.
    """
    include = " ".join(f'--include "{pattern}"' for pattern in spec.files)
    allow = {"env": "\n  - or allow downloads: unset HF_HUB_OFFLINE.",
             "arg": "\n  - or allow downloads: call with offline=False."}.get(offline, "")
    return WeightsNotFoundError(
        f"Weights {spec.name!r} (about {human_size(spec.size_mb * 1e6)}) are not available: {reason}\n"
        f"Expected files ({spec.repo_id} at revision {spec.revision}): {', '.join(spec.files)}\n"
        "Ways to provide them:\n"
        f"  - pass the path of a local folder holding these files instead of {spec.name!r};\n"
        f"  - on a machine with network, run `hf download {spec.repo_id} "
        f"--revision {spec.revision} {include} --local-dir DIR` (the `hf` command comes "
        f"with huggingface_hub), copy DIR here and pass its path;{allow}",
        reason=reason,
    )


def _offline_from_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE_VALUES


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

    env_offline = _offline_from_env()
    if offline is None:
        offline = env_offline
    if offline:
        raise _not_found(spec, "offline mode is on and the hub cache does not hold them.",
                         offline="env" if env_offline else "arg")
    from .settings import confirm_download

    if not confirm_download(f"{spec.description}: {spec.repo_id}, about {spec.size_mb:g} MB"):
        raise _not_found(spec, "the download was declined (set download_without_asking to download without "
                               "a question).")
    return _download(spec, _cache_dir(cache_dir), cached, progress, HUB_TIMEOUT)


def _registry_spec(name: str | os.PathLike) -> ModelSpec:
    spec = REGISTRY.get(os.fspath(name))
    if spec is None:
        raise ValueError(
            f"unknown model {os.fspath(name)!r}: not an existing path and not one of "
            f"{', '.join(sorted(REGISTRY))}"
        )
    return spec


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


def _cache_dir(cache_dir: str | os.PathLike | None) -> str | os.PathLike | None:
    if cache_dir is None:
        from .settings import load_settings

        cache_dir = load_settings().cache_dir or None
    return cache_dir


def _cached_snapshot(spec: ModelSpec, cache_dir: str | os.PathLike | None) -> Optional[Path]:
    """The hub cache's snapshot folder of `spec`'s pinned revision (complete or not), or None; no network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(spec.repo_id, local_files_only=True, revision=spec.revision,
                                      allow_patterns=list(spec.files), cache_dir=_cache_dir(cache_dir)))
    except LocalEntryNotFoundError:
        return None


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
