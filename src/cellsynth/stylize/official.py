"""Import official InST / InST-Microscopy ``embeddings.pt`` files without running pickle code.

The official file is ``torch.save({"string_to_token": {"*": tensor}, "attention":
<Attentions module>})``; unpickling it normally would import and run classes from
``ldm.modules...``. Here torch's restricted (``weights_only``) unpickler reads it,
with the two known ``ldm.modules`` classes mapped to inert local stand-ins and
only plain torch layers allowed; a file naming any other global is refused
before anything is unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..weights import file_sha256
from .mapper import StyleMapper
from .tokens import StyleToken

__all__ = ["import_official_token", "OFFICIAL_GLOBALS"]


class _OfficialAttentions(nn.Module):
    """Stand-in for ``ldm.modules.embedding_manager.Attentions``: holds weights, runs nothing."""

    def forward(self, *args, **kwargs):  # pragma: no cover - never called
        raise RuntimeError("stand-in module; load its state dict into a StyleMapper")


class _OfficialCrossAttention(nn.Module):
    """Stand-in for ``ldm.modules.attention.CrossAttention``."""

    def forward(self, *args, **kwargs):  # pragma: no cover - never called
        raise RuntimeError("stand-in module; load its state dict into a StyleMapper")


OFFICIAL_GLOBALS = {
    "ldm.modules.embedding_manager.Attentions": _OfficialAttentions,
    "ldm.modules.attention.CrossAttention": _OfficialCrossAttention,
    "torch.nn.modules.linear.Linear": nn.Linear,
    "torch.nn.modules.dropout.Dropout": nn.Dropout,
    "torch.nn.modules.container.Sequential": nn.Sequential,
}
"""The globals an official file may name besides tensors and containers, and their stand-ins."""


def import_official_token(
    path: os.PathLike | str,
    *,
    placeholder: str | None = None,
    encoder: str = "clip-vit-large-patch14",
    heads: int = 8,
    quirk: bool = True,
) -> StyleToken:
    """Read an official ``embeddings.pt`` into a :class:`StyleToken`.

    Parameters
    ----------
    path : path-like
        The official checkpoint.
    placeholder : str, optional
        Placeholder word; default the (single) key of ``string_to_token``.
    encoder : str
        Image encoder the token was fit with (official: CLIP ViT-L/14).
    heads : int
        Attention heads of the mapper (official 8).
    quirk : bool
        Reproduce the official CLIP-input quirk when the token is used (default
        True, which is what official tokens were fit to).

    Returns
    -------
    StyleToken
        With ``source="official:<sha256>"``.

    Raises
    ------
    FileNotFoundError
        If `path` does not exist.
    ValueError
        If the file names any global outside :data:`OFFICIAL_GLOBALS` (for
        example code to execute), is not a readable checkpoint, or lacks the
        official keys.
    """
    import pickle
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such token file: {path}")
    try:
        named = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (zipfile.BadZipFile, RuntimeError, pickle.UnpicklingError, ValueError, EOFError) as err:
        raise ValueError(f"{path} is not a readable torch checkpoint ({err})") from err
    refused = sorted(set(named) - set(OFFICIAL_GLOBALS))
    if refused:
        raise ValueError(
            f"refusing to load {path}: it names globals other than the known InST classes: "
            f"{', '.join(refused)}. It may run code when unpickled; it was not loaded."
        )
    allowed = [(cls, name) for name, cls in OFFICIAL_GLOBALS.items()]
    try:
        with torch.serialization.safe_globals(allowed):
            doc = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"refusing to load {path}: {str(err).splitlines()[0]}") from err
    if not isinstance(doc, dict) or "string_to_token" not in doc or "attention" not in doc:
        keys = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{path} is not an InST embeddings file: expected keys 'string_to_token' and "
                         f"'attention', got {keys}")
    strings = doc["string_to_token"]
    if not isinstance(strings, dict) or len(strings) != 1:
        raise ValueError(f"{path}: expected one placeholder in string_to_token, got {strings!r}")
    attention = doc["attention"]
    if isinstance(attention, nn.Module):
        state = attention.state_dict()
    elif isinstance(attention, dict):
        state = attention
    else:
        raise ValueError(f"{path}: 'attention' is neither a module nor a state dict ({type(attention).__name__})")
    mapper = StyleMapper.from_state_dict({k: v.float() for k, v in state.items()}, heads=heads)
    return StyleToken(
        mapper=mapper,
        placeholder=placeholder or next(iter(strings)),
        clip_input="official-quirk" if quirk else "proper",
        encoder=encoder,
        training={"official_token_id": int(torch.as_tensor(next(iter(strings.values()))).reshape(-1)[0])},
        source=f"official:{file_sha256(path)}",
    )
