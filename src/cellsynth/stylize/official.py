"""Import official InST / InST-Microscopy ``embeddings.pt`` files without running pickle code.

The official file is ``torch.save({"string_to_token": {"*": tensor}, "attention":
<Attentions module>})``; unpickling it normally would import and run classes from
``ldm.modules...``. Here torch's restricted (``weights_only``) unpickler reads it,
with the two known ``ldm.modules`` classes and the three plain torch layers they
hold all read as inert stand-ins that only keep their pickled attributes; the
weights are then collected from those attributes, so no code of the file's
classes runs. A file naming any other global is refused before anything is
unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..state_dicts import load_restricted
from ..weights import file_sha256
from .mapper import StyleMapper
from .tokens import StyleToken, load_token

__all__ = ["import_official_token", "read_token", "OFFICIAL_GLOBALS", "OFFICIAL_SUFFIXES"]


class _StandIn:
    """Inert stand-in for every class an official file may name.

    The restricted unpickler creates it without calling any constructor and
    hands it the pickled attribute dict, which it only stores: no method of the
    original classes (and no hook recorded in the file) ever runs.
    """

    state: dict = {}

    def __setstate__(self, state) -> None:
        self.state = state if isinstance(state, dict) else {}


OFFICIAL_GLOBALS = (
    "ldm.modules.embedding_manager.Attentions",
    "ldm.modules.attention.CrossAttention",
    "torch.nn.modules.linear.Linear",
    "torch.nn.modules.dropout.Dropout",
    "torch.nn.modules.container.Sequential",
)
"""The globals an official file may name besides tensors and containers (all read as inert stand-ins)."""

OFFICIAL_SUFFIXES = (".pt", ".ckpt", ".bin")
"""File suffixes read as official checkpoints by :func:`read_token`."""


def read_token(path: os.PathLike | str) -> StyleToken:
    """A style token from our token folder (or its ``token.json``) or an official ``embeddings.pt``.

    Official files are imported with :func:`import_official_token` (quirk mode on).
    """
    p = Path(path)
    if p.is_file() and p.suffix.lower() in OFFICIAL_SUFFIXES:
        return import_official_token(p)
    return load_token(p)


def _module_tensors(obj, prefix: str = "", depth: int = 0) -> dict:
    """The parameters and buffers of a pickled module tree, by state-dict name, read from its attributes."""
    if not isinstance(obj, _StandIn):
        raise ValueError(f"expected a pickled module at {prefix or 'attention'!r}, got {type(obj).__name__}")
    if depth > 8:  # the official tree is 3 deep; deeper (or cyclic) trees are not InST files
        raise ValueError(f"module tree too deep at {prefix!r}")
    tensors = {}
    for group in ("_parameters", "_buffers"):
        for name, value in (obj.state.get(group) or {}).items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{prefix}{name} is not a tensor ({type(value).__name__})")
            if name not in (obj.state.get("_non_persistent_buffers_set") or ()):
                tensors[f"{prefix}{name}"] = value.detach()
    for name, child in (obj.state.get("_modules") or {}).items():
        if child is not None:
            tensors.update(_module_tensors(child, f"{prefix}{name}.", depth + 1))
    return tensors


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
    path = Path(path)
    if placeholder is not None and (not isinstance(placeholder, str) or not placeholder.strip()
                                    or len(placeholder.split()) != 1):
        raise ValueError(f"placeholder must be one word without spaces (e.g. '*' or '<style>'), got {placeholder!r}")
    if not path.is_file():
        raise FileNotFoundError(f"no such token file: {path}")
    doc = load_restricted(path, set(OFFICIAL_GLOBALS).__contains__, _StandIn, what="InST embeddings file",
                          refusal="other than the known InST classes: {names}. It may run code when unpickled; it "
                                  "was not loaded.")
    if not isinstance(doc, dict) or "string_to_token" not in doc or "attention" not in doc:
        keys = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{path} is not an InST embeddings file: expected keys 'string_to_token' and "
                         f"'attention', got {keys}")
    strings = doc["string_to_token"]
    if not isinstance(strings, dict) or len(strings) != 1:
        raise ValueError(f"{path}: expected one placeholder in string_to_token, got {strings!r}")
    attention = doc["attention"]
    if isinstance(attention, _StandIn):
        try:
            state = _module_tensors(attention)
        except (AttributeError, TypeError) as err:
            raise ValueError(f"{path}: 'attention' is not a readable module ({err})") from None
    elif isinstance(attention, dict) and all(isinstance(v, torch.Tensor) for v in attention.values()):
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
