"""One registry of pretrained model specs and one resolver for their files.

:func:`resolve` turns a registry name or a local path into a folder on disk:
an explicit local path first, then weights shipped in ``resources/``, then the
Hugging Face hub cache, then a download with progress. Offline, a missing model
raises :class:`WeightsNotFoundError` that says how to provide the files.

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
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cellsynth.progress import Cancelled, ProgressCallback, report

__all__ = [
    "REGISTRY", "ModelSpec", "WeightsNotFoundError", "file_sha256", "read_state_dict", "resolve",
    "resources_dir", "sd_v1_config_dir",
]

_TRUE_VALUES = {"1", "on", "yes", "true"}


class WeightsNotFoundError(FileNotFoundError):
    """Model files are neither on disk nor downloadable; the message says how to provide them."""


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


def _not_found(spec: ModelSpec, reason: str) -> WeightsNotFoundError:
    include = " ".join(f'--include "{pattern}"' for pattern in spec.files)
    return WeightsNotFoundError(
        f"Weights for model {spec.name!r} ({spec.repo_id} at revision {spec.revision}, "
        f"about {spec.size_mb:g} MB) are not available: {reason}\n"
        f"Expected files: {', '.join(spec.files)}\n"
        "Ways to provide them:\n"
        f"  - pass the path of a local folder holding these files instead of {spec.name!r};\n"
        f"  - on a machine with network, run `hf download {spec.repo_id} "
        f"--revision {spec.revision} {include} --local-dir DIR` (the `hf` command comes "
        "with huggingface_hub), copy DIR here and pass its path;\n"
        "  - or allow downloads: unset HF_HUB_OFFLINE and call with offline=False."
    )


def _progress_tqdm(progress: ProgressCallback, stage: str) -> type:
    """A tqdm class for ``snapshot_download`` that forwards byte counts to `progress`.

    The hub opens several bars; the first one counting bytes (the snapshot's
    overall counter) is forwarded, the others (files done, per-stage counters)
    are ignored so that a progress bar does not jump between counters. Nothing
    is printed. Events follow tqdm's refresh rate (about ten per second).
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
                total = int(self.total) if self.total else None
                try:
                    report(progress, stage, int(self.n), total, self.desc)
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
        If the files are missing and cannot be downloaded (offline, or a network
        error, chained as ``__cause__``), or a local folder lacks expected files.

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

    spec = REGISTRY.get(os.fspath(name_or_path))
    if spec is None:
        raise ValueError(
            f"unknown model {os.fspath(name_or_path)!r}: not an existing path and not one of "
            f"{', '.join(sorted(REGISTRY))}"
        )

    if spec.bundled is not None:
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

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if cache_dir is None:
        from .settings import load_settings

        cache_dir = load_settings().cache_dir or None
    hub_args = dict(revision=spec.revision, allow_patterns=list(spec.files), cache_dir=cache_dir)
    try:
        cached = Path(snapshot_download(spec.repo_id, local_files_only=True, **hub_args))
    except LocalEntryNotFoundError:
        cached = None
    if cached is not None and not _missing_files(cached, spec.files):
        return cached

    if offline is None:
        offline = _offline_from_env()
    if offline:
        raise _not_found(spec, "offline mode is on and the hub cache does not hold them.")
    from .settings import confirm_download

    if not confirm_download(f"{spec.description}: {spec.repo_id}, about {spec.size_mb:g} MB"):
        raise _not_found(spec, "the download was declined (set download_without_asking to download without "
                               "a question).")

    tqdm_class = None if progress is None else _progress_tqdm(progress, f"download {spec.name}")
    try:
        folder = Path(snapshot_download(spec.repo_id, tqdm_class=tqdm_class, **hub_args))
    except Cancelled:
        raise
    except Exception as err:  # hub errors are OSError; its HTTP client's transport errors are not
        raise _not_found(spec, f"the download failed ({type(err).__name__}: {err}).") from err
    missing = _missing_files(folder, spec.files)
    if missing:
        raise _not_found(spec, f"the hub snapshot at {folder} lacks {', '.join(missing)}.")
    return folder


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


# Globals a training checkpoint (PyTorch Lightning, as the official Stable Diffusion and
# InST checkpoints are) may name besides tensors: trainer callbacks, hyper-parameter
# containers, numpy scalars. They are read as inert stand-ins; nothing of theirs runs.
_INERT_MODULE_PREFIXES = (
    "pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.", "numpy.", "_codecs.",
    "torch.torch_version.", "typing.", "collections.",
)
_STATE_DICT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")


class _Inert:
    """Inert stand-in for a class or function a checkpoint names: it only keeps what it is given."""

    def __init__(self, *args, **kwargs) -> None:
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state) -> None:
        self.state = state


def _inert_global(name: str) -> bool:
    return any(name.startswith(prefix) for prefix in _INERT_MODULE_PREFIXES)


def read_state_dict(path: str | os.PathLike) -> dict:
    """The tensors of a checkpoint file we did not produce, read without running its code.

    ``.safetensors`` files are read with safetensors. Pickle checkpoints
    (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) are read with torch's restricted
    (``weights_only``) unpickler; the extra globals a Lightning checkpoint names
    (callbacks, ``omegaconf`` hyper-parameters, numpy scalars) are read as inert
    stand-ins that only store their arguments. A file naming any other global
    (for example ``os.system``) is refused before anything is unpickled. A
    ``"state_dict"`` entry is unwrapped (repeatedly, as Lightning nests it);
    only tensor entries are returned.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    dict of str to torch.Tensor

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the suffix is not a checkpoint's, the file names a global that could
        run code, it is not a readable checkpoint, or it holds no tensors.

    Examples
    --------
    >>> import tempfile, torch
    >>> path = Path(tempfile.mkdtemp()) / "m.ckpt"
    >>> torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, path)
    >>> read_state_dict(path)
    {'w': tensor([1., 1.])}
    """
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    suffix = path.suffix.lower()
    if suffix not in _STATE_DICT_SUFFIXES:
        raise ValueError(f"{path} is not a checkpoint file; expected one of {', '.join(_STATE_DICT_SUFFIXES)}")
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            doc = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{path} is not a readable safetensors file ({err})") from err
    else:
        try:
            named = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except (zipfile.BadZipFile, RuntimeError, pickle.UnpicklingError, ValueError, EOFError) as err:
            raise ValueError(f"{path} is not a readable torch checkpoint ({err})") from err
        refused = sorted(name for name in named if not _inert_global(name))
        if refused:
            raise ValueError(
                f"refusing to load {path}: it names globals that could run code when unpickled: "
                f"{', '.join(refused)}. It was not loaded; convert it to .safetensors where it was made."
            )
        try:
            with torch.serialization.safe_globals([(_Inert, name) for name in named]):
                doc = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
        except pickle.UnpicklingError as err:
            raise ValueError(f"refusing to load {path}: {str(err).splitlines()[0]}") from err
        except Exception as err:  # anything a crafted file can provoke is a bad file, not a crash
            raise ValueError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err})") from err
    while isinstance(doc, dict) and isinstance(doc.get("state_dict"), dict):
        doc = doc["state_dict"]
    tensors = {k: v for k, v in doc.items() if isinstance(v, torch.Tensor)} if isinstance(doc, dict) else {}
    if not tensors:
        raise ValueError(f"{path} holds no weights (no tensors in it or in its 'state_dict')")
    return tensors
