"""Counting on the CPU with onnxruntime: the counter's network exported to ONNX once, then run by ORT.

On the CPU, onnxruntime runs the density network faster than PyTorch's eager
mode (fused convolution + activation kernels, no per-operator dispatch;
``benchmarks/bench_count.py``: 1.22x on two idle cores, 2-3x on a busy
machine); on a GPU PyTorch is kept. The network (BatchNorm already folded) is
exported with :func:`torch.onnx.export` with dynamic batch and tile sizes, the
export is cached in memory per weights state and on disk by a hash of the
weights (``<cache>/onnx/<sha256>.onnx``, the cache being ``$CELLSYNTH_ONNX_CACHE`` or
the user cache folder; an empty ``$CELLSYNTH_ONNX_CACHE`` keeps it in memory
only). ``$CELLSYNTH_ENGINE=torch`` (or ``count_cells(..., engine="torch")``)
turns it off. When onnxruntime is missing or a network cannot be exported,
counting falls back to PyTorch and says so in ``meta["engine"]``.

An ONNX file is a protobuf graph of standard operators: loading one runs no
Python code.
"""

from __future__ import annotations

import hashlib
import io as _io
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np

__all__ = ["ENGINES", "available", "onnx_cache_dir", "resolve_engine", "session_for"]

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnxruntime")
_FORMAT = "cellsynth-onnx-1"  # part of the cache key: bump when the export changes


def available() -> bool:
    """onnxruntime and onnx (for the export) are importable."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except Exception:  # pragma: no cover - depends on the installation
        return False
    return True


def resolve_engine(engine: Optional[str], device) -> str:
    """``"onnxruntime"`` or ``"torch"`` for ``engine`` (``"auto"``: ORT on the CPU when installed)."""
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


def onnx_cache_dir() -> Optional[Path]:
    """Folder of exported counters, or None (``$CELLSYNTH_ONNX_CACHE`` set to an empty string)."""
    env = os.environ.get("CELLSYNTH_ONNX_CACHE")
    if env is not None:
        return Path(env).expanduser() if env.strip() else None
    import platformdirs

    return Path(platformdirs.user_cache_dir("cellsynth")) / "onnx"


def _export(net, stride: int) -> bytes:
    import copy

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
    return buf.getvalue()


def _cache_key(net, in_chans: int) -> str:
    """Hash of everything the export depends on: the weights themselves, the input channels, the versions."""
    import onnxruntime
    import torch

    h = hashlib.sha256(f"{_FORMAT}|{in_chans}|{torch.__version__}|{onnxruntime.__version__}".encode())
    for name, t in net.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


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


class OrtRunner:
    """An onnxruntime session of one counter network: ``runner(batch) -> density`` (numpy, float32)."""

    def __init__(self, model: bytes, threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, int(threads))
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self.session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": np.ascontiguousarray(batch, dtype=np.float32)})[0]


def session_for(counter: Any, fused_net, stamp: tuple) -> Optional[OrtRunner]:
    """The counter's ORT runner for this weights state (made once), or None when the export fails."""
    import torch

    threads = torch.get_num_threads()
    cached = counter.extra.get("onnx_runner")
    if cached is not None and cached[0] == (stamp, threads):
        return cached[1]
    in_chans = int(counter.config.get("in_chans", 1))
    folder = onnx_cache_dir()
    path = folder / f"{_cache_key(fused_net, in_chans)}.onnx" if folder is not None else None
    runner = None
    data = _read_cached(path) if path is not None else None
    if data is not None:
        try:
            runner = OrtRunner(data, threads)
        except Exception:  # a damaged cache file: export again
            runner = None
    if runner is None:
        try:
            data = _export(fused_net, int(getattr(fused_net, "stride", 16)))
            runner = OrtRunner(data, threads)
        except Exception as exc:  # an operator ORT or the exporter does not support: PyTorch counts instead
            log.warning("onnxruntime cannot run counter %s (%s); counting with PyTorch", counter.name, exc)
            counter.extra["onnx_runner"] = ((stamp, threads), None)
            return None
        if path is not None:
            _write_cached(path, data)
    counter.extra["onnx_runner"] = ((stamp, threads), runner)
    return runner
