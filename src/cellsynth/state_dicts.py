"""Reading checkpoint files we did not produce, without running code from them.

:func:`read_state_dict` reads a state dict from a ``.safetensors`` file, or from a
pickle-based checkpoint (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) with torch's
``weights_only`` loader, the few non-tensor globals such checkpoints name being
read as inert stand-ins. torch is imported inside the function.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["read_state_dict", "load_restricted"]


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
        doc = load_restricted(path, _inert_global, _Inert, what="checkpoint",
                              refusal="that could run code when unpickled: {names}. It was not loaded; convert it "
                                      "to .safetensors where it was made.")
    while isinstance(doc, dict) and isinstance(doc.get("state_dict"), dict):
        doc = doc["state_dict"]
    tensors = {k: v for k, v in doc.items() if isinstance(v, torch.Tensor)} if isinstance(doc, dict) else {}
    if not tensors:
        raise ValueError(f"{path} holds no weights (no tensors in it or in its 'state_dict')")
    return tensors


def load_restricted(path: str | os.PathLike, allowed, stand_in: type, *, refusal: str, what: str):
    """``torch.load`` of a pickle checkpoint whose every named global passes ``allowed``, each read as ``stand_in``.

    The globals are listed before anything is unpickled; a file naming one that
    ``allowed(name)`` refuses is not loaded. Loading uses torch's restricted
    (``weights_only``) unpickler, so nothing the file names is called.

    Parameters
    ----------
    allowed : callable
        ``allowed(name) -> bool`` for each global (``"module.Name"``) the file names.
    stand_in : type
        Read in place of every allowed global (it must only store what it is given).
    refusal : str
        The end of the refusal message: why such globals are refused, with
        ``{names}`` where the refused names go.
    what : str
        What the file should be ("checkpoint", "InST embeddings file"), for the
        message about an unreadable file.

    Raises
    ------
    ValueError
        Not a readable torch checkpoint, a refused global, or anything a
        crafted file provokes while it is read.
    """
    import pickle
    import zipfile

    import torch

    try:
        named = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (zipfile.BadZipFile, RuntimeError, pickle.UnpicklingError, ValueError, EOFError) as err:
        raise ValueError(f"{path} is not a readable torch checkpoint ({err})") from err
    refused = sorted(name for name in named if not allowed(name))
    if refused:
        raise ValueError(f"refusing to load {path}: it names globals " + refusal.format(names=", ".join(refused)))
    try:
        with torch.serialization.safe_globals([(stand_in, name) for name in named]):
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as err:
        raise ValueError(f"refusing to load {path}: {str(err).splitlines()[0]}") from err
    except Exception as err:  # anything a crafted file can provoke is a bad file, not a crash
        raise ValueError(f"{path} is not a readable {what} ({type(err).__name__}: {err})") from err
