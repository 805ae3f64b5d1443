"""The registry of pretrained model specs and the helpers every weights module shares.

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

from .._memory import human_size

__all__ = ["REGISTRY", "ModelSpec", "WeightsNotFoundError", "file_sha256", "human_size", "resources_dir"]

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
    packaged = Path(__file__).parents[1] / "_resources"
    if packaged.exists():
        return packaged.resolve()
    return Path(__file__).resolve().parents[3] / "resources"


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


def offline_from_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE_VALUES


def _registry_spec(name: str | os.PathLike) -> ModelSpec:
    spec = REGISTRY.get(os.fspath(name))
    if spec is None:
        raise ValueError(
            f"unknown model {os.fspath(name)!r}: not an existing path and not one of "
            f"{', '.join(sorted(REGISTRY))}"
        )
    return spec



def _cache_dir(cache_dir: str | os.PathLike | None) -> str | os.PathLike | None:
    if cache_dir is None:
        from ..settings import load_settings

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


