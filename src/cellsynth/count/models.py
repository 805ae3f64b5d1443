"""Counter objects: build, save and load counters (density, regression, classic).

A trained counter is a folder with ``model.safetensors`` (the state dict) and
``config.json`` (what to build and how to run it). :func:`load_counter` turns
``"default"`` (the model shipped in ``resources/models/counter-default``),
``"classic"`` (no weights, seeded watershed in an Otsu mask), a folder, a
``.safetensors`` file or a foreign ``.pt``/``.pth`` state dict (read with
``torch.load(weights_only=True)``, never unpickling code) into a :class:`Counter`.

torch is imported inside the functions, so importing this module is cheap. On
the CPU, a counter whose onnxruntime export is already cached is loaded without
building its network (see :mod:`cellsynth.count.engines`): counting with it
imports neither torch nor timm, and the network is built from the file the
first time something asks for ``counter.net`` (training, the torch engine,
export).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any, Optional

from .. import io
from .counter import (CONFIG_FILE, COUNTER_FORMAT, KINDS, WEIGHTS_FILE, Counter, _adapt_keys, _build_loaded,
                      _check_config_numbers, counter_config, net_stamp)

__all__ = ["Counter", "load_counter", "save_counter", "counter_config", "COUNTER_FORMAT", "KINDS"]


def _check_weights_size(path: Path) -> None:
    """Refuse weights larger than the free memory before reading (or hashing) them."""
    io.require_memory(2.0 * path.stat().st_size, what=f"loading the weights in {path}",
                      hint="is this really a counter? the shipped one is under 1 MB")


def _state_dict_from_file(path: Path) -> dict:
    _check_weights_size(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{path} is not a readable safetensors weights file: {exc}") from exc
    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle refusal and corrupt files alike
        raise ValueError(f"{path} could not be read as plain tensors (it holds other Python objects, which are "
                         f"never unpickled, or it is corrupt: {_load_error(exc)})") from exc
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return obj


def _load_error(exc: BaseException) -> str:
    """The useful part of torch.load's refusal (its message runs over several lines of general advice)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        detail = next((ln.strip() for ln in text.split(marker, 1)[1].splitlines() if ln.strip()), "")
        return detail or type(exc).__name__
    return io.first_line(exc)[:200]


# Input scaling of the paper's public training code: 8-bit images to [0, 1], then
# (x - 0.0414) / 0.0203 on every channel.
OFFICIAL_NORMALIZE = {"mode": "fixed", "mean": 0.0414, "std": 0.0203}


def _guess_config(state: dict, path: Path) -> dict:
    """Config for a foreign state dict: the paper's EfficientNet-B0 regressor (timm or torchvision keys)."""
    keys = {k.removeprefix("module.") for k in state}
    if any(k.startswith("stem.") or k.startswith("top.") for k in keys):
        raise ValueError(f"{path} looks like a density counter but has no config.json beside it")
    tv_stem = next((v for k, v in state.items() if k.removeprefix("module.") == "features.0.0.weight"), None)
    if tv_stem is not None and any(k.startswith("classifier.1.") for k in keys):
        # torchvision's efficientnet_b0 with classifier[1] = Linear(1280, 1): the paper's public code.
        cfg = counter_config("regression", backbone="torchvision:efficientnet_b0", in_chans=int(tv_stem.shape[1]),
                             normalize=dict(OFFICIAL_NORMALIZE))
        cfg["rescale"] = False
        cfg["description"] = "imported EfficientNet-B0 regressor (torchvision layout, the paper's public code)"
        return cfg
    stem = next((v for k, v in state.items() if k.endswith("conv_stem.weight")), None)
    if stem is None:
        raise ValueError(
            f"{path} is not an EfficientNet-B0 state dict (neither timm's conv_stem.weight nor torchvision's "
            "features.0.0.weight) and has no config.json"
        )
    return counter_config("regression", in_chans=int(stem.shape[1]))



def _resolve_path(model: str | os.PathLike) -> tuple[str, Path]:
    if isinstance(model, str) and model == "default":
        from ..weights import resources_dir

        return "default", resources_dir() / "models" / "counter-default"
    p = Path(model).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"no counter model at {str(model)!r}; expected 'default', 'classic', a folder with "
            f"{WEIGHTS_FILE} and {CONFIG_FILE}, a .safetensors/.pt file or a bioimage.io .zip package exported by "
            "cellsynth export-counter"
        )
    return str(model), p


def load_counter(model: str | os.PathLike | Counter = "default", *, device: Any = "auto") -> Counter:
    """Load a counter by name or path.

    Parameters
    ----------
    model : str, path-like or Counter
        ``"default"`` (shipped density counter), ``"classic"`` (no weights), a
        folder holding ``model.safetensors`` + ``config.json`` (as written by
        training), a ``.safetensors`` file with ``config.json`` beside it, or a
        ``.pt``/``.pth`` state dict (loaded with ``weights_only=True``; without a
        config it is taken as the paper's EfficientNet-B0 regressor), or a
        bioimage.io ``.zip`` package written by
        :func:`~cellsynth.count.bioimageio.export_counter`. A Counter is returned as is.
    device : str or torch.device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``. float16 on CUDA.

    Returns
    -------
    Counter

    Raises
    ------
    FileNotFoundError
        Nothing at that path, or a folder without weights.
    ValueError
        A config that is not a counter config, weights that do not fit it, or a
        pickle that ``weights_only`` refuses.

    Examples
    --------
    >>> c = load_counter("classic")
    >>> c.kind, c.name, c.net is None
    ('classic', 'classic', True)
    """
    if isinstance(model, Counter):
        return model
    if isinstance(model, str) and model == "classic":
        from .classic import ClassicParams

        cfg = counter_config("classic")
        cfg["classic"] = ClassicParams(diameter=cfg["diameter"]).to_dict()
        return Counter(kind="classic", name="classic", config=cfg)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a name, a path or a Counter, got {type(model).__name__}")
    name, p = _resolve_path(model)
    if p.is_file() and p.suffix.lower() == ".zip":
        from .packages import load_package_counter

        return to_device(load_package_counter(p), device)
    if p.is_dir():
        weights, cfg_path = p / WEIGHTS_FILE, p / CONFIG_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{p} holds no {WEIGHTS_FILE}; expected a counter folder written by training")
    else:
        weights, cfg_path = p, p.with_name(CONFIG_FILE)
    waiting = _from_cached_export(name, p, weights, cfg_path, device)
    if waiting is not None:
        return waiting
    state = _state_dict_from_file(weights)
    if cfg_path.is_file():
        cfg = io.read_json(cfg_path)
        if not isinstance(cfg, dict) or cfg.get("format") != COUNTER_FORMAT or cfg.get("kind") not in KINDS:
            raise ValueError(f"{cfg_path} is not a counter config (format {COUNTER_FORMAT!r}, kind in {KINDS})")
        _check_config_numbers(cfg, cfg_path)
    else:
        cfg = _guess_config(state, weights)
    if cfg["kind"] == "classic":
        return Counter(kind="classic", name=name, config=cfg, path=p)
    from ..weights import file_sha256

    net = _build_loaded(cfg, _adapt_keys(state, cfg["kind"]), weights)
    counter = Counter(kind=cfg["kind"], name=name, config=cfg, net=net, sha256=file_sha256(weights), path=p)
    counter = to_device(counter, device)
    if _file_keyed(weights, cfg_path) and counter.device.type == "cpu":
        from .engines import file_key

        counter.extra["onnx_source"] = {"key": file_key(counter.sha256, cfg), "stamp": net_stamp(counter.net)}
    return counter


def _file_keyed(weights: Path, cfg_path: Path) -> bool:
    """Counters whose ONNX export is keyed by their files (a safetensors file and its config)."""
    return weights.suffix == ".safetensors" and cfg_path.is_file()


def _cpu_without_torch(device: Any) -> bool:
    """Whether ``device`` is the CPU, decided without importing torch (False when only torch can tell)."""
    if not isinstance(device, str):
        return getattr(device, "type", None) == "cpu"
    if device == "cpu":
        return True
    if device != "auto":
        return False
    if "torch" in sys.modules:
        from ..device import resolve_device

        return resolve_device("auto").type == "cpu"
    from ..device import nvidia_driver_present

    # "auto" is the CPU where there is no accelerator torch could use (no NVIDIA or ROCm driver, no Apple silicon)
    return not (nvidia_driver_present() or os.path.exists("/dev/kfd")
                or (sys.platform == "darwin" and os.uname().machine == "arm64"))


def _from_cached_export(name: str, p: Path, weights: Path, cfg_path: Path, device: Any) -> Optional[Counter]:
    """A counter that waits to build its network, when its onnxruntime export is cached; else None."""
    if not _file_keyed(weights, cfg_path) or not weights.is_file() or not _cpu_without_torch(device):
        return None
    from . import engines

    if engines.resolve_engine(None, "cpu") != "onnxruntime":
        return None
    cfg = io.read_json(cfg_path)
    if not isinstance(cfg, dict) or cfg.get("format") != COUNTER_FORMAT or cfg.get("kind") not in KINDS:
        raise ValueError(f"{cfg_path} is not a counter config (format {COUNTER_FORMAT!r}, kind in {KINDS})")
    _check_config_numbers(cfg, cfg_path)
    if cfg["kind"] == "classic":
        return None
    from ..weights import file_sha256

    _check_weights_size(weights)  # before hashing: a file claiming a terabyte is refused at once
    sha = file_sha256(weights)
    key = engines.file_key(sha, cfg)
    threads = engines.default_threads()
    runner = engines.cached_runner(key, threads)
    if runner is None:  # not exported yet, or a damaged export: load as usual (the next count exports again)
        return None
    counter = Counter(kind=cfg["kind"], name=name, config=cfg, sha256=sha, path=p)
    counter.extra.update(onnx_source={"key": key, "stamp": None}, onnx_runner=((("file", key), threads), runner),
                         stride=runner.stride)
    counter.__dict__["_build"] = _build_waiting
    return counter


def _build_waiting(counter: Counter) -> None:
    """Build the network of a counter loaded from a cached export: from its file, as load_counter does."""
    import torch

    from ..weights import file_sha256

    p = Path(counter.path)
    weights = p / WEIGHTS_FILE if p.is_dir() else p
    if file_sha256(weights) != counter.sha256:
        raise ValueError(f"{weights} changed since the counter was loaded; load it again")
    with torch.inference_mode(False):  # ordinary tensors, even when first asked for while counting
        net = _build_loaded(counter.config, _adapt_keys(_state_dict_from_file(weights), counter.kind), weights)
        counter.__dict__["_build"] = None
        counter.net = net
        to_device(counter, "cpu")
    counter.extra["onnx_source"]["stamp"] = net_stamp(counter.net)



def to_device(counter: Counter, device: Any = "auto") -> Counter:
    """Move a counter's network to ``device`` in the device's default dtype (in place)."""
    if counter.net is None:
        return counter
    import torch

    from ..device import default_dtype, resolve_device

    dev = resolve_device(device)
    dtype = default_dtype(dev)
    counter.net = counter.net.to(device=dev, dtype=dtype)
    if dev.type == "cpu":
        counter.net = counter.net.to(memory_format=torch.channels_last)
    counter.device, counter.dtype = dev, dtype
    return counter


def save_counter(
    net: Any, config: dict, out_dir: str | os.PathLike, *, half: bool = False, overwrite: bool = False
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` to ``out_dir`` atomically.

    Parameters
    ----------
    net : torch.nn.Module
    config : dict
        See :func:`counter_config`.
    out_dir : path-like
    half : bool
        Store floating-point tensors as float16 (halves the file).
    overwrite : bool

    Returns
    -------
    Path
        ``out_dir``.
    """
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    state = {}
    for k, v in net.state_dict().items():
        v = v.detach().cpu().contiguous()
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"refusing to save a counter whose weights hold NaN or infinite values ({k})")
        if half and v.is_floating_point():
            v = v.half()
        state[k] = v
    cfg = copy.deepcopy(config)
    cfg["dtype"] = "float16" if half else "float32"
    with io.atomic_path(out / WEIGHTS_FILE, overwrite=overwrite) as tmp:
        save_file(state, str(tmp))
    io.write_json(out / CONFIG_FILE, cfg, overwrite=overwrite)
    return out


def new_counter(config: dict, *, device: Any = "cpu", name: str = "untrained") -> Counter:
    """An untrained counter built from ``config`` (random initialisation)."""
    from ._nets import build_net

    if config.get("kind") == "classic":
        return Counter(kind="classic", name=name, config=config)
    net = build_net(config).float().eval()
    return to_device(Counter(kind=config["kind"], name=name, config=config, net=net), device)
