"""Loading an InST pipeline: SD from a diffusers folder, a single file or a registry name."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..progress import ProgressCallback

if TYPE_CHECKING:
    from ..weights import WeightsStatus

__all__ = ["PipelineWeights", "check_weights", "load_pipeline", "clear_cache", "model_record", "optimize_pipeline"]

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


@dataclass(frozen=True)
class PipelineWeights:
    """What :func:`check_weights` found: the Stable Diffusion model and the CLIP image encoder.

    ``encoder`` is None when the model folder carries its own ``image_encoder``.
    """

    model: "WeightsStatus"
    encoder: Optional["WeightsStatus"]

    @property
    def parts(self) -> list:
        return [s for s in (self.model, self.encoder) if s is not None]

    @property
    def ready(self) -> bool:
        """Everything InST needs is on this computer."""
        return all(s.available for s in self.parts)

    @property
    def to_download(self) -> list:
        """The missing registry models that a download can fetch."""
        return [s for s in self.parts if s.downloadable]

    @property
    def download_bytes(self) -> int:
        """Approximate size of :attr:`to_download`, in bytes."""
        return sum(s.size_bytes for s in self.to_download)

    def summary(self) -> str:
        """One line for a status display."""
        from ..weights import human_size

        def describe(status, what: str) -> str:
            if status.available:
                where = {"folder": f"folder {status.path.name!r}", "file": f"file {status.path.name!r}"}
                return f"{what}: {where.get(status.where, status.where)}"
            if status.downloadable:
                return f"{what} missing ({human_size(status.size_bytes)})"
            return f"{what}: {status.problem}"

        parts = [describe(self.model, "Stable Diffusion")]
        if self.encoder is not None:
            parts.append(describe(self.encoder, "image encoder"))
        head = "Weights ready" if self.ready else "Weights not ready"
        return f"{head}: {'; '.join(parts)}."


def check_weights(model: os.PathLike | str = "sd-v1-4", image_encoder: os.PathLike | str = "clip-vit-large-patch14",
                  *, cache_dir: os.PathLike | str | None = None) -> PipelineWeights:
    """Whether the weights :func:`load_pipeline` needs are on this computer; no network, no file read.

    A folder must be a diffusers pipeline (``model_index.json``); a single file must
    be a ``.ckpt`` or ``.safetensors`` checkpoint; the image encoder is needed unless
    the folder carries one.

    Examples
    --------
    >>> import tempfile
    >>> found = check_weights(tempfile.mkdtemp(), "/no/such/encoder")
    >>> found.ready, found.model.problem.endswith("(no model_index.json)")
    (False, True)
    """
    from ..weights import check

    status = check(model, cache_dir=cache_dir)
    path = status.path
    has_encoder = False
    if status.available and status.where in ("folder", "hub cache", "bundled") and path.is_dir():
        if not (path / "model_index.json").is_file():
            status = replace(status, available=False, problem=f"{path.name!r} is not a Stable Diffusion folder "
                                                              "(no model_index.json)")
        has_encoder = (path / "image_encoder" / "config.json").is_file()
    elif status.available and path.suffix.lower() not in _SINGLE_FILE_SUFFIXES:
        status = replace(status, available=False, problem=f"{path.name!r} is not a Stable Diffusion checkpoint "
                                                          f"(expected {' or '.join(_SINGLE_FILE_SUFFIXES)})")
    encoder = None if has_encoder else check(image_encoder, cache_dir=cache_dir)
    return PipelineWeights(status, encoder)


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
    config: os.PathLike | str | None = None,
    channels_last: Optional[bool] = None,
    compile: bool = False,
):
    """An :class:`~cellsynth.stylize.InSTPipeline` ready on `device`.

    Parameters
    ----------
    model : path-like or str
        A diffusers Stable Diffusion v1 folder (one saved by ``save_pretrained``
        may already hold ``image_encoder``), a single-file checkpoint
        (``.ckpt``/``.safetensors``, the format of the official InST setup; read
        offline with the pinned v1.4 configs, a Lightning ``.ckpt`` through a
        restricted unpickler), or a registry name (default ``"sd-v1-4"``, the
        weights of the paper; downloaded on first use with progress).
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
    config : path-like, optional
        For a single-file `model`: a diffusers folder whose configs describe it
        (default :func:`cellsynth.weights.sd_v1_config_dir`, SD v1.4). The
        tokenizer comes from its ``tokenizer`` folder, else from `image_encoder`'s
        folder (CLIP ViT-L/14 carries the tokenizer of SD v1).
    channels_last, compile : optional
        Speed settings, see :func:`optimize_pipeline` (default: channels-last on
        CUDA, no compilation).

    Raises
    ------
    cellsynth.weights.WeightsNotFoundError
        Weights missing and not downloadable (the message says how to provide them).
    ValueError
        Unknown model name, a folder that is not a Stable Diffusion pipeline, or
        a single file that is not a Stable Diffusion v1 checkpoint (or names code
        to run when unpickled).
    """
    from ..device import default_dtype, resolve_device
    from ..weights import resolve

    dev = resolve_device(device)
    torch_dtype = default_dtype(dev, prefer=dtype)
    if channels_last is None:
        channels_last = dev.type == "cuda"
    key = (os.fspath(model), os.fspath(image_encoder), str(dev), str(torch_dtype),
           None if config is None else os.fspath(config), bool(channels_last), bool(compile))
    with _LOCK:
        if cache and key in _CACHE:
            return _CACHE[key]
    path = resolve(model, offline=offline, progress=progress)
    pipe = _load(path, image_encoder, torch_dtype, offline, progress, config)
    pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    optimize_pipeline(pipe, channels_last=channels_last, compile=compile)
    if cache:
        with _LOCK:
            _CACHE[key] = pipe
    return pipe


def optimize_pipeline(pipe, *, channels_last: bool = True, compile: bool = False) -> dict:
    """Speed settings for InST on a GPU, applied in place; returns what was applied.

    - attention through PyTorch's fused ``scaled_dot_product_attention``
      (diffusers' ``AttnProcessor2_0``; flash / memory-efficient kernels on CUDA);
    - ``channels_last`` memory format of the UNet and VAE (faster convolutions
      with cuDNN and tensor cores);
    - optionally ``torch.compile`` of the UNet (compiled on its first call).

    Examples
    --------
    >>> from cellsynth.stylize.tiny import tiny_pipeline
    >>> optimize_pipeline(tiny_pipeline(0), channels_last=True)
    {'attention': 'sdpa', 'channels_last': True, 'compiled': False}
    """
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    for module in (pipe.unet, pipe.vae):
        module.set_attn_processor(AttnProcessor2_0())
        if channels_last:
            module.to(memory_format=torch.channels_last)
    if compile and not hasattr(pipe.unet, "_orig_mod"):
        pipe.unet = torch.compile(pipe.unet)
    return {"attention": "sdpa", "channels_last": bool(channels_last), "compiled": hasattr(pipe.unet, "_orig_mod")}


def _load(path: Path, image_encoder, torch_dtype, offline, progress, config=None):
    from diffusers import DDIMScheduler
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from ..device import dtype_kwargs
    from ..weights import resolve
    from .pipeline_inst import INST_SCHEDULER_CONFIG, InSTPipeline

    if path.is_file():
        if path.suffix.lower() not in _SINGLE_FILE_SUFFIXES:
            raise ValueError(f"{path} is not a Stable Diffusion checkpoint; expected a folder or a "
                             f"{' or '.join(_SINGLE_FILE_SUFFIXES)} file")
    elif not (path / "model_index.json").is_file():
        raise ValueError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    state = _read_sd_v1(path) if path.is_file() else None  # checked before anything else is loaded
    extra = {"safety_checker": None, "requires_safety_checker": False, **dtype_kwargs("diffusers", torch_dtype)}
    has_encoder = path.is_dir() and (path / "image_encoder" / "config.json").is_file()
    if not has_encoder:
        enc_path = resolve(image_encoder, offline=offline, progress=progress)
        extra["image_encoder"] = CLIPVisionModelWithProjection.from_pretrained(
            enc_path, **dtype_kwargs("transformers", torch_dtype))
        if not (path.is_dir() and (path / "feature_extractor").is_dir()):
            extra["feature_extractor"] = CLIPImageProcessor.from_pretrained(enc_path)
    if path.is_file():
        pipe = _from_single_file(path, state, extra, torch_dtype, config, image_encoder, offline, progress)
    else:
        pipe = InSTPipeline.from_pretrained(path, **extra)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **INST_SCHEDULER_CONFIG)
    return pipe


_UNET_PREFIX, _TEXT_PREFIX = "model.diffusion_model.", "cond_stage_model.transformer."


def _read_sd_v1(path: Path) -> dict:
    """The state dict of a single-file SD v1 checkpoint, read without running code, its layout checked."""
    from ..state_dicts import read_state_dict

    state = read_state_dict(path)
    if not any(k.startswith(_UNET_PREFIX) for k in state):
        raise ValueError(f"{path} is not a Stable Diffusion checkpoint: it has no {_UNET_PREFIX}* weights")
    if not any(k.startswith(_TEXT_PREFIX) for k in state):
        raise ValueError(f"{path} is not a Stable Diffusion v1 checkpoint: it has no CLIP text encoder "
                         f"({_TEXT_PREFIX}*); SD 2.x and SDXL checkpoints are not supported (InST uses SD v1)")
    return state


def _from_single_file(path: Path, state: dict, extra: dict, torch_dtype, config, image_encoder, offline,
                      progress):
    """An InST pipeline from an original (LDM-layout) SD v1 checkpoint, offline.

    diffusers converts each component from the state dict with the configs of
    `config` (no hub access); the text encoder is the CLIP text transformer under
    ``cond_stage_model.transformer.``.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ..device import dtype_kwargs
    from ..weights import resolve, sd_v1_config_dir
    from .pipeline_inst import InSTPipeline

    cfg = Path(config) if config is not None else sd_v1_config_dir()
    if not (cfg / "unet" / "config.json").is_file():
        raise ValueError(f"{cfg} is not a diffusers config folder (no unet/config.json)")
    common = dict(config=str(cfg), local_files_only=True, **dtype_kwargs("diffusers", torch_dtype))
    try:
        unet = UNet2DConditionModel.from_single_file(state, subfolder="unet", **common)
        vae = AutoencoderKL.from_single_file(state, subfolder="vae", **common)
    except (KeyError, RuntimeError, ValueError) as err:  # shapes or keys that do not fit the configs
        raise ValueError(f"{path} does not fit the Stable Diffusion configs in {cfg}: "
                         f"{str(err).splitlines()[0]}") from err
    text_state = {k[len(_TEXT_PREFIX):]: v for k, v in state.items() if k.startswith(_TEXT_PREFIX)}
    text_state.pop("text_model.embeddings.position_ids", None)  # a buffer older checkpoints saved
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(cfg / "text_encoder"))
    missing, unexpected = text_encoder.load_state_dict(text_state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: the CLIP text encoder does not fit {cfg / 'text_encoder'} "
                         f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    text_encoder = text_encoder.to(torch_dtype).eval()
    del state, text_state
    if (cfg / "tokenizer").is_dir():
        tokenizer = CLIPTokenizer.from_pretrained(cfg / "tokenizer")
    else:
        tokenizer = CLIPTokenizer.from_pretrained(resolve(image_encoder, offline=offline, progress=progress))
    scheduler = PNDMScheduler.from_pretrained(cfg, subfolder="scheduler")
    return InSTPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                        safety_checker=None, feature_extractor=extra.get("feature_extractor"),
                        image_encoder=extra.get("image_encoder"), requires_safety_checker=False)
