"""Loading an InST pipeline: SD from a diffusers folder, a single file or a registry name."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Optional

from ..progress import ProgressCallback

__all__ = ["load_pipeline", "clear_cache", "model_record"]

_CACHE: dict = {}
_LOCK = threading.Lock()
_SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors")


def model_record(model: os.PathLike | str) -> dict:
    """Provenance of a model argument: registry name with hub id and revision, or the local path.

    Examples
    --------
    >>> model_record("sd-v1-4")["revision"]
    '133a221b8aa7292a167afc5127cb63fb5005638b'
    """
    from ..weights import REGISTRY

    spec = REGISTRY.get(os.fspath(model))
    if spec is not None and not Path(model).exists():
        return {"model": spec.name, "repo_id": spec.repo_id, "revision": spec.revision}
    return {"model": str(Path(model).expanduser().resolve())}


def clear_cache() -> None:
    """Forget pipelines kept by :func:`load_pipeline` (frees their memory)."""
    with _LOCK:
        _CACHE.clear()


def load_pipeline(
    model: os.PathLike | str = "sd-v1-4",
    *,
    image_encoder: os.PathLike | str = "clip-vit-large-patch14",
    device: str = "auto",
    dtype: str = "auto",
    offline: Optional[bool] = None,
    progress: Optional[ProgressCallback] = None,
    cache: bool = True,
):
    """An :class:`~cellsynth.stylize.InSTPipeline` ready on `device`.

    Parameters
    ----------
    model : path-like or str
        A diffusers Stable Diffusion v1 folder (one saved by ``save_pretrained``
        may already hold ``image_encoder``), a single-file checkpoint
        (``.ckpt``/``.safetensors``), or a registry name (default ``"sd-v1-4"``,
        the weights of the paper; downloaded on first use with progress).
    image_encoder : path-like or str
        CLIP image encoder folder or registry name, used when `model` has none.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``.
    dtype : {"auto", "float32", "float16", "bfloat16"}
        Model dtype; ``"auto"`` is float16 on CUDA and float32 elsewhere.
    offline : bool, optional
        Never download (default: the ``HF_HUB_OFFLINE`` environment variable).
    progress : ProgressCallback, optional
        Download progress.
    cache : bool
        Keep the pipeline for later calls with the same arguments.

    Raises
    ------
    cellsynth.weights.WeightsNotFoundError
        Weights missing and not downloadable (the message says how to provide them).
    ValueError
        Unknown model name, or a folder that is not a Stable Diffusion pipeline.
    """
    from ..device import default_dtype, resolve_device
    from ..weights import resolve

    dev = resolve_device(device)
    torch_dtype = default_dtype(dev, prefer=dtype)
    key = (os.fspath(model), os.fspath(image_encoder), str(dev), str(torch_dtype))
    with _LOCK:
        if cache and key in _CACHE:
            return _CACHE[key]
    path = resolve(model, offline=offline, progress=progress)
    pipe = _load(path, image_encoder, torch_dtype, offline, progress)
    pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    if cache:
        with _LOCK:
            _CACHE[key] = pipe
    return pipe


def _load(path: Path, image_encoder, torch_dtype, offline, progress):
    from diffusers import DDIMScheduler
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from ..weights import resolve
    from .pipeline_inst import INST_SCHEDULER_CONFIG, InSTPipeline

    if path.is_file():
        if path.suffix.lower() not in _SINGLE_FILE_SUFFIXES:
            raise ValueError(f"{path} is not a Stable Diffusion checkpoint; expected a folder or a "
                             f"{' or '.join(_SINGLE_FILE_SUFFIXES)} file")
    elif not (path / "model_index.json").is_file():
        raise ValueError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    extra = {"safety_checker": None, "requires_safety_checker": False, "dtype": torch_dtype}
    has_encoder = path.is_dir() and (path / "image_encoder" / "config.json").is_file()
    if not has_encoder:
        enc_path = resolve(image_encoder, offline=offline, progress=progress)
        extra["image_encoder"] = CLIPVisionModelWithProjection.from_pretrained(enc_path, dtype=torch_dtype)
        if not (path.is_dir() and (path / "feature_extractor").is_dir()):
            extra["feature_extractor"] = CLIPImageProcessor.from_pretrained(enc_path)
    if path.is_file():
        pipe = InSTPipeline.from_single_file(str(path), **extra)
    else:
        pipe = InSTPipeline.from_pretrained(path, **extra)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **INST_SCHEDULER_CONFIG)
    return pipe
