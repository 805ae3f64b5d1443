"""Compute device choice, dtype policy and out-of-memory handling.

torch is imported inside the functions, so importing this module stays cheap.

Examples
--------
>>> resolve_device("cpu")
device(type='cpu')
>>> default_dtype("cpu")
torch.float32
>>> available_devices()[:2]
['auto', 'cpu']
"""

from __future__ import annotations

import contextlib
import platform
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    import torch

    DeviceLike = Union[str, torch.device]

__all__ = [
    "device_choices",
    "DeviceOutOfMemoryError",
    "available_devices",
    "default_dtype",
    "describe_device",
    "oom_guard",
    "resolve_device",
    "TrainingPrecision",
    "training_precision",
    "dtype_kwargs",
]

_DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")


class DeviceOutOfMemoryError(RuntimeError):
    """A device ran out of memory; the message says what ran out and what to try."""


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def device_choices() -> list:
    """Device names for a menu, without importing torch at start-up.

    The real :func:`available_devices` once torch is loaded, else ``auto``,
    ``cpu`` and the accelerators whose drivers are present (an NVIDIA driver,
    Apple silicon); a choice torch cannot use is refused with a clear error
    when a run resolves it.

    Examples
    --------
    >>> device_choices()[:2]
    ['auto', 'cpu']
    """
    if "torch" in sys.modules:
        return available_devices()
    choices = ["auto", "cpu"]
    if nvidia_driver_present():
        choices.append("cuda")
    if sys.platform == "darwin" and platform.machine() == "arm64":
        choices.append("mps")
    return choices


def nvidia_driver_present() -> bool:
    """Whether an NVIDIA driver is installed (cheap: no torch import); torch decides later if CUDA works."""
    import os

    if sys.platform == "win32":
        return os.path.exists(os.path.join(os.environ.get("SystemRoot", r"C:\Windows"), "System32", "nvcuda.dll"))
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/usr/lib/wsl/lib/libcuda.so")


def available_devices() -> list[str]:
    """Device names this machine can use, for a GUI choice box.

    Returns
    -------
    list of str
        ``"auto"`` and ``"cpu"``, then ``"cuda"`` and ``"cuda:N"`` for each GPU,
        then ``"mps"`` on Apple silicon.

    Examples
    --------
    >>> "cpu" in available_devices()
    True
    """
    import torch

    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        names.append("cuda")
        names.extend(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    if _mps_available():
        names.append("mps")
    return names


def resolve_device(device: DeviceLike = "auto") -> torch.device:
    """Turn a device name into a usable :class:`torch.device`.

    Parameters
    ----------
    device : str or torch.device, optional
        ``"auto"`` (CUDA if present, else Apple MPS, else CPU), ``"cpu"``,
        ``"cuda"``, ``"cuda:N"`` or ``"mps"``.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        If the name is not a device name, or names a device this machine lacks.
    TypeError
        If `device` is neither a string nor a torch.device.

    Examples
    --------
    >>> resolve_device("auto").type in {"cuda", "mps", "cpu"}
    True
    >>> resolve_device("tpu")
    Traceback (most recent call last):
    ...
    ValueError: unknown device 'tpu'; expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'
    """
    import torch

    if isinstance(device, str):
        name = device.strip().lower()
        if name == "auto":
            from .settings import load_settings

            preferred = load_settings().device
            if preferred != "auto":  # the settings' default device
                return resolve_device(preferred)
            if torch.cuda.is_available():
                return torch.device("cuda")
            return torch.device("mps" if _mps_available() else "cpu")
        try:
            parsed = torch.device(name)
        except RuntimeError:
            parsed = None
    elif isinstance(device, torch.device):
        parsed = device
    else:
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")

    if parsed is None or parsed.type not in {"cpu", "cuda", "mps"}:
        raise ValueError(
            f"unknown device {device!r}; expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
        )
    if parsed.type == "cpu":
        return torch.device("cpu")
    if parsed.type == "cuda":
        usable = torch.cuda.is_available() and (
            parsed.index is None or parsed.index < torch.cuda.device_count()
        )
    else:
        usable = _mps_available()
    if not usable:
        raise ValueError(
            f"device {str(device)!r} is not available on this machine; "
            f"available: {', '.join(available_devices())}"
        )
    return parsed


def default_dtype(device: DeviceLike, *, prefer: str = "auto") -> torch.dtype:
    """The floating-point dtype to run models in on `device`.

    The policy: float16 on CUDA (half the memory, tensor cores), float32 on
    CPU and MPS, where half precision is slow or numerically fragile.

    Parameters
    ----------
    device : str or torch.device
        A device name or device; ``"auto"`` is resolved first. Other names are
        parsed but not checked for availability, so the policy can be queried anywhere.
    prefer : {"auto", "float32", "float16", "bfloat16"}, optional
        ``"auto"`` applies the policy; any other value is returned as is.

    Returns
    -------
    torch.dtype

    Raises
    ------
    ValueError
        If `prefer` is not one of the names above, or `device` is not a device name.

    Examples
    --------
    >>> default_dtype("cuda:0")
    torch.float16
    >>> default_dtype("mps")
    torch.float32
    >>> default_dtype("cpu", prefer="bfloat16")
    torch.bfloat16
    """
    import torch

    if prefer not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {prefer!r}; expected one of {', '.join(_DTYPE_NAMES)}")
    if prefer != "auto":
        return getattr(torch, prefer)
    if isinstance(device, str):
        device = device.strip().lower()
        if device == "auto":
            device = resolve_device("auto")
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}") from err
    return torch.float16 if kind == "cuda" else torch.float32


def describe_device(device: DeviceLike = "auto") -> str:
    """A short human description of a device, for a GUI label.

    Parameters
    ----------
    device : str or torch.device, optional
        Resolved with :func:`resolve_device` first.

    Returns
    -------
    str
        For example ``"CUDA 0: NVIDIA H100 (79.1 GiB)"``, ``"Apple MPS"`` or
        ``"CPU (8 threads)"``.

    Examples
    --------
    >>> describe_device("cpu").startswith("CPU (")
    True
    """
    import torch

    dev = resolve_device(device)
    if dev.type == "cuda":
        index = torch.cuda.current_device() if dev.index is None else dev.index
        props = torch.cuda.get_device_properties(index)
        return f"CUDA {index}: {props.name} ({props.total_memory / 2**30:.1f} GiB)"
    if dev.type == "mps":
        return "Apple MPS"
    threads = torch.get_num_threads()
    return f"CPU ({threads} thread{'s' if threads != 1 else ''})"


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


@contextlib.contextmanager
def oom_guard(what: str, *, device: DeviceLike | None = None) -> Iterator[None]:
    """Turn an out-of-memory error raised in the block into :class:`DeviceOutOfMemoryError`.

    Catches ``torch.cuda.OutOfMemoryError`` and any ``RuntimeError`` whose
    message says "out of memory" (MPS, CPU allocators). The CUDA cache is
    emptied so that a retry with smaller settings can succeed. The original
    error is chained as ``__cause__``; other errors pass through unchanged.

    Parameters
    ----------
    what : str
        What was running, as a noun phrase (``"denoising"``, ``"tile 3 of 8"``).
    device : str or torch.device, optional
        The device the block runs on, named in the message. When omitted it is
        guessed from the error (CUDA or MPS).

    Raises
    ------
    DeviceOutOfMemoryError
        When the block ran out of memory.

    Examples
    --------
    >>> try:
    ...     with oom_guard("denoising", device="cpu"):
    ...         raise RuntimeError("DefaultCPUAllocator: out of memory")
    ... except DeviceOutOfMemoryError as err:
    ...     print(err)  # doctest: +ELLIPSIS
    Out of memory during denoising on cpu. Try a smaller tile or batch size, ...
    """
    import torch

    try:
        yield
    except RuntimeError as err:
        if isinstance(err, DeviceOutOfMemoryError) or not _is_oom(err):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if device is not None:
            where = str(device)
        elif isinstance(err, torch.cuda.OutOfMemoryError) or "cuda" in str(err).lower():
            where = "cuda"
        elif "mps" in str(err).lower():
            where = "mps"
        else:
            where = "the device"
        raise DeviceOutOfMemoryError(
            f"Out of memory during {what} on {where}. Try a smaller tile or batch size, "
            "fewer steps or a smaller image, or run on device 'cpu' (slower, but limited "
            "only by system memory)."
        ) from err


@dataclass(frozen=True)
class TrainingPrecision:
    """How a training step mixes precisions (see :func:`training_precision`).

    Attributes
    ----------
    trainable_dtype : torch.dtype
        Always float32: the weights the optimiser updates and their gradients.
    autocast_dtype : torch.dtype or None
        Autocast dtype of the forward pass; None runs in the weights' dtypes.
    grad_scaler : bool
        Scale the loss (``torch.amp.GradScaler``): with float16 anywhere in the
        graph, small gradients flowing back through it would underflow to zero.
    """

    trainable_dtype: Any
    autocast_dtype: Optional[Any]
    grad_scaler: bool

    def describe(self) -> dict:
        """JSON-ready record."""
        name = (lambda d: None if d is None else str(d).removeprefix("torch."))
        return {"trainable": name(self.trainable_dtype), "autocast": name(self.autocast_dtype),
                "grad_scaler": self.grad_scaler}


def training_precision(device: DeviceLike, frozen_dtype, *, mixed_precision: bool = True) -> TrainingPrecision:
    """The precision policy for training a small module through large frozen ones.

    Trainable parameters stay float32. Frozen models in float16 or bfloat16 run
    under autocast in their own dtype (so the float32 trainable module's output
    meets them in that dtype); frozen float32 models run under bfloat16 autocast
    on CUDA (float16 where bfloat16 is unsupported) when `mixed_precision`, in
    full precision elsewhere. A loss scaler is used whenever float16 is involved.

    Parameters
    ----------
    device : str or torch.device
    frozen_dtype : torch.dtype
        The dtype of the frozen models.
    mixed_precision : bool
        Allow autocast when the frozen models are float32.

    Returns
    -------
    TrainingPrecision

    Examples
    --------
    >>> import torch
    >>> training_precision("cuda", torch.float16).describe()
    {'trainable': 'float32', 'autocast': 'float16', 'grad_scaler': True}
    >>> training_precision("cpu", torch.bfloat16).describe()
    {'trainable': 'float32', 'autocast': 'bfloat16', 'grad_scaler': False}
    >>> training_precision("cpu", torch.float32).describe()
    {'trainable': 'float32', 'autocast': None, 'grad_scaler': False}
    """
    import torch

    kind = torch.device(device).type if not isinstance(device, str) or device != "auto" else resolve_device().type
    if frozen_dtype in (torch.float16, torch.bfloat16):
        autocast = frozen_dtype
    elif frozen_dtype == torch.float32:
        autocast = None
        if mixed_precision and kind == "cuda":
            autocast = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        raise ValueError(f"frozen models must be float32, float16 or bfloat16, got {frozen_dtype}")
    return TrainingPrecision(torch.float32, autocast, autocast == torch.float16)


# The releases whose ``from_pretrained`` takes ``dtype=`` (earlier ones take ``torch_dtype=`` and
# ignore or pass on an unknown ``dtype``).
_DTYPE_KWARG_SINCE = {"diffusers": (0, 40), "transformers": (4, 56)}


def _release(library: str) -> tuple:
    from importlib.metadata import version

    parts = []
    for piece in version(library).split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def dtype_kwargs(library: str, dtype) -> dict:
    """The keyword that sets the weights' dtype in `library`'s ``from_pretrained`` / ``from_single_file``.

    Parameters
    ----------
    library : {"diffusers", "transformers"}
    dtype : torch.dtype or None

    Returns
    -------
    dict
        ``{"dtype": dtype}`` where the installed release takes it, else
        ``{"torch_dtype": dtype}``; empty when `dtype` is None.

    Examples
    --------
    >>> import torch
    >>> list(dtype_kwargs("transformers", torch.float16)) in (["dtype"], ["torch_dtype"])
    True
    >>> dtype_kwargs("diffusers", None)
    {}
    """
    if library not in _DTYPE_KWARG_SINCE:
        raise ValueError(f"library must be one of {', '.join(_DTYPE_KWARG_SINCE)}, got {library!r}")
    if dtype is None:
        return {}
    return {"dtype" if _release(library) >= _DTYPE_KWARG_SINCE[library] else "torch_dtype": dtype}
