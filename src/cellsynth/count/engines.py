"""Counting on the CPU with onnxruntime: the counter's network exported to ONNX once, then run by ORT.

On the CPU, onnxruntime runs the density network faster than PyTorch's eager
mode (fused convolution + activation kernels, no per-operator dispatch;
``benchmarks/bench_count.py``: 1.22x on two idle cores, 2-3x on a busy
machine); on a GPU PyTorch is kept. The network (BatchNorm already folded) is
exported with :func:`torch.onnx.export` with dynamic batch and tile sizes and
cached (``<cache>/<key>.onnx``, the cache being ``$CELLSYNTH_ONNX_CACHE`` or
the user cache folder; an empty ``$CELLSYNTH_ONNX_CACHE`` keeps exports in
memory only). ``$CELLSYNTH_ENGINE=torch`` (or ``count_cells(..., engine="torch")``)
turns it off. When onnxruntime is missing or a network cannot be exported,
counting falls back to PyTorch and says so in ``meta["engine"]``.

Cache keys. A counter loaded from a ``.safetensors`` file with its
``config.json`` and not changed since is keyed by the file itself
(:func:`file_key`: the weights file's SHA-256, the config, the installed torch,
timm and onnxruntime releases and the network code), which needs no torch to
compute. When that export is cached, :func:`~cellsynth.count.load_counter`
builds no network at all and counting imports neither torch nor timm: the
network is built only when something needs it (training, the torch engine, a
GPU, a new export). Any other network (trained or changed in memory) is keyed
by its weights. Every export carries its key in the ONNX metadata, so a
damaged, truncated or misplaced file is never run: it is exported anew.

An ONNX file is a protobuf graph of standard operators: loading one runs no
Python code.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io as _io
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np

__all__ = ["ENGINES", "available", "default_threads", "export_bytes", "file_key", "install", "onnx_cache_dir",
           "resolve_engine", "session_for"]

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnxruntime")
_FORMAT = "cellsynth-onnx-2"  # part of every cache key: bump when the export changes
_MEMORY: dict = {}  # key -> ONNX bytes: exports kept in this process (no disk cache, or given by a batch client)
_MEMORY_MAX = 8


def available() -> bool:
    """onnxruntime is importable and onnx (for the export) is installed."""
    try:
        import onnxruntime  # noqa: F401
    except Exception:  # pragma: no cover - depends on the installation
        return False
    return importlib.util.find_spec("onnx") is not None


def resolve_engine(engine: Optional[str], device) -> str:
    """``"onnxruntime"`` or ``"torch"`` for ``engine`` (``"auto"``: ORT on the CPU when installed).

    ``device`` is a torch device, a device name (``"cpu"``, ``"cuda:0"``) or None (the CPU).
    """
    if engine is None or engine == "auto":
        engine = os.environ.get("CELLSYNTH_ENGINE", "auto").strip().lower() or "auto"
        if engine not in ENGINES:
            raise ValueError(f"CELLSYNTH_ENGINE must be one of {ENGINES}, got {engine!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    on_cpu = device is None or getattr(device, "type", str(device)) == "cpu"
    if engine == "torch" or not on_cpu:
        return "torch"
    if not available():
        if engine == "onnxruntime":
            raise ValueError("engine='onnxruntime' needs the onnxruntime and onnx packages: "
                             "pip install onnxruntime onnx")
        return "torch"
    return "onnxruntime"


def default_threads() -> int:
    """Threads of an ORT session: torch's intra-op threads once torch is imported, else what torch would take.

    (``$OMP_NUM_THREADS`` / ``$MKL_NUM_THREADS``, else the physical cores.) The
    counts do not depend on it, only the speed.
    """
    if "torch" in sys.modules:
        return int(sys.modules["torch"].get_num_threads())
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        try:
            n = int(os.environ.get(var, ""))
        except ValueError:
            continue
        if n > 0:
            return n
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:  # pragma: no cover - psutil is a dependency of dask.distributed
        n = None
    return max(1, int(n or os.cpu_count() or 1))


def onnx_cache_dir() -> Optional[Path]:
    """Folder of exported counters, or None (``$CELLSYNTH_ONNX_CACHE`` set to an empty string)."""
    env = os.environ.get("CELLSYNTH_ONNX_CACHE")
    if env is not None:
        return Path(env).expanduser() if env.strip() else None
    import platformdirs

    return Path(platformdirs.user_cache_dir("cellsynth")) / "onnx"


@functools.lru_cache(maxsize=1)
def _versions() -> str:
    """The releases and code an export depends on, read without importing torch or timm."""
    import importlib.metadata as md

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "none"

    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except Exception:  # pragma: no cover
        ort = "none"
    nets = hashlib.sha256((Path(__file__).with_name("_nets.py")).read_bytes()).hexdigest()[:16]
    return f"{_FORMAT}|torch {version('torch')}|timm {version('timm')}|onnxruntime {ort}|nets {nets}"


def file_key(weights_sha256: str, config: dict) -> str:
    """Cache key of the export of a counter as loaded from a weights file and its config (no torch needed).

    Examples
    --------
    >>> a = file_key("ab" * 32, {"kind": "density", "blocks": 4})
    >>> a == file_key("ab" * 32, {"blocks": 4, "kind": "density"}), a == file_key("cd" * 32, {"kind": "density"})
    (True, False)
    """
    cfg = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(f"{_versions()}|file|{weights_sha256}|{cfg}".encode()).hexdigest()


def _cache_key(net, in_chans: int) -> str:
    """Cache key of a network in memory: its weights, the input channels, the versions."""
    h = hashlib.sha256(f"{_versions()}|weights|{in_chans}".encode())
    for name, t in net.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _export(net, stride: int, key: str) -> bytes:
    import copy

    import onnx
    import torch

    side = max(64, 4 * stride)
    x = torch.zeros(1, 1, side, side)  # counting feeds one-channel tiles (regression nets repeat them inside)
    buf = _io.BytesIO()
    cpu_net = copy.deepcopy(net).float().cpu().to(memory_format=torch.contiguous_format).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(cpu_net, (x,), buf, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch", 2: "rows", 3: "cols"},
                                        "y": {0: "batch", 2: "rows", 3: "cols"}},
                          opset_version=17)
    model = onnx.load_model_from_string(buf.getvalue())
    for k, v in (("cellsynth_key", key), ("stride", str(int(stride)))):
        prop = model.metadata_props.add()
        prop.key, prop.value = k, v
    return model.SerializeToString()


def _read_cached(path: Path) -> Optional[bytes]:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data if data else None


def _write_cached(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only or full cache only costs the export next time
        log.debug("could not cache the ONNX export at %s: %s", path, exc)


def install(key: str, data: bytes) -> None:
    """Keep an export in this process's memory (e.g. one a batch client sends to its workers)."""
    if _MEMORY.get(key) is data:
        return
    _MEMORY.pop(key, None)
    _MEMORY[key] = bytes(data)
    while len(_MEMORY) > _MEMORY_MAX:
        _MEMORY.pop(next(iter(_MEMORY)))


def _load(key: str) -> Optional[bytes]:
    data = _MEMORY.get(key)
    if data is None:
        folder = onnx_cache_dir()
        data = _read_cached(folder / f"{key}.onnx") if folder is not None else None
    return data


def _store(key: str, data: bytes) -> None:
    folder = onnx_cache_dir()
    if folder is None:
        install(key, data)
    else:
        _write_cached(folder / f"{key}.onnx", data)


class OrtRunner:
    """An onnxruntime session of one counter network: ``runner(batch) -> density`` (numpy, float32).

    ``key`` and ``stride`` come from the export's metadata.
    """

    def __init__(self, model: bytes, threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, int(threads))
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self.session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self.key = meta.get("cellsynth_key")
        self.stride = int(meta.get("stride", 16))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": np.ascontiguousarray(batch, dtype=np.float32)})[0]


def cached_runner(key: str, threads: Optional[int] = None) -> Optional[OrtRunner]:
    """A runner of the cached export ``key``, or None when there is none or it is damaged or not that export."""
    data = _load(key)
    if data is None:
        return None
    try:
        runner = OrtRunner(data, default_threads() if threads is None else threads)
    except Exception as exc:  # truncated or not an ONNX file
        log.debug("cached ONNX export %s cannot be loaded (%s); exporting again", key[:12], exc)
        runner = None
    if runner is not None and runner.key != key:
        log.debug("cached ONNX export %s holds another export (%s); exporting again", key[:12], runner.key)
        runner = None
    if runner is None:
        _MEMORY.pop(key, None)
    return runner


def _source_key(counter: Any) -> Optional[str]:
    """The file key when the counter's network is the one its file holds (built or still waiting), else None."""
    src = counter.extra.get("onnx_source")
    if not src or not src.get("key"):
        return None
    if not counter.network_built:
        return src["key"]
    return src["key"] if src.get("stamp") == counter.weights_stamp() else None


def session_for(counter: Any) -> Optional[OrtRunner]:
    """The counter's ORT runner for its current weights (made once), or None when the export fails.

    A cached export is used without building the network; otherwise the network
    is built (importing torch) and exported, and the export cached.
    """
    threads = default_threads()
    key = _source_key(counter)
    if key is not None:
        stamp, net = ("file", key), None
    else:
        net = counter.inference_net()
        stamp = counter.extra["inference_net"][0]
    cached = counter.extra.get("onnx_runner")
    if cached is not None and cached[0] == (stamp, threads):
        return cached[1]
    if key is None:
        key = _cache_key(net, counter.settings.in_chans)
    runner = cached_runner(key, threads)
    if runner is None:
        try:
            if net is None:  # no usable export of the file: build the network and export it
                net = counter.inference_net()
            data = _export(net, int(getattr(net, "stride", 16)), key)
            runner = OrtRunner(data, threads)
        except Exception as exc:  # an operator ORT or the exporter does not support: PyTorch counts instead
            log.warning("onnxruntime cannot run counter %s (%s); counting with PyTorch", counter.name, exc)
            counter.extra["onnx_runner"] = ((stamp, threads), None)
            return None
        _store(key, data)
    counter.extra["onnx_runner"] = ((stamp, threads), runner)
    return runner


def export_bytes(counter: Any) -> Optional[tuple]:
    """``(key, ONNX bytes)`` of the counter's export, made and cached when missing; None when it cannot export."""
    runner = session_for(counter)
    if runner is None:
        return None
    data = _load(runner.key)
    return (runner.key, data) if data is not None else None

