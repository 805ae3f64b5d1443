"""Style tokens: the mapper plus what is needed to use it, our file format, injection.

A token folder holds ``mapper.safetensors`` (the mapper's weights, official
parameter names) and ``token.json`` (format, placeholder, CLIP input mode, image
encoder, mapper sizes, training parameters, style-image hashes). Loading never
executes code. Official ``embeddings.pt`` files are imported by
:func:`cellsynth.stylize.import_official_token`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import io
from .mapper import StyleMapper
from .params import CLIP_INPUTS

__all__ = [
    "StyleToken", "save_token", "load_token", "inject_token", "clip_image_embeds", "clip_pixels", "clip_view",
    "image_sha256", "placeholder_id", "TOKEN_FORMAT",
]

TOKEN_FORMAT = "cellsynth-inst-token"
TOKEN_VERSION = 1
_WEIGHTS, _CONFIG = "mapper.safetensors", "token.json"


@dataclass
class StyleToken:
    """A learned InST style token.

    Parameters
    ----------
    mapper : StyleMapper
        Maps the CLIP image embedding of a style image to a token embedding.
    placeholder : str
        The prompt word replaced by the mapped embedding (official ``"*"``).
    clip_input : {"proper", "official-quirk"}
        How style images are given to CLIP: ``"official-quirk"`` reproduces the
        official code (the [-1, 1] image cast to uint8), which official tokens were
        fit to; tokens trained here use ``"proper"``.
    encoder : str
        Name or path of the CLIP image encoder the token was fit with.
    training : dict
        Training parameters and history summary (free-form, JSON-serialisable).
    style_sha256 : list of str
        Hashes of the style images (see :func:`image_sha256`).
    source : str
        ``"trained"`` or ``"official:<sha256 of embeddings.pt>"``.
    """

    mapper: StyleMapper
    placeholder: str = "*"
    clip_input: str = "proper"
    encoder: str = "clip-vit-large-patch14"
    training: dict = field(default_factory=dict)
    style_sha256: list = field(default_factory=list)
    source: str = "trained"

    def __post_init__(self) -> None:
        if self.clip_input not in CLIP_INPUTS:
            raise ValueError(f"clip_input must be one of {CLIP_INPUTS}, got {self.clip_input!r}")
        if not isinstance(self.placeholder, str) or not self.placeholder.strip():
            raise ValueError(f"placeholder must be a non-empty string, got {self.placeholder!r}")

    @property
    def dim(self) -> int:
        return int(self.mapper.config["dim"])

    def describe(self) -> dict:
        """JSON-ready description (what goes into ``token.json`` and provenance)."""
        return {
            "format": TOKEN_FORMAT, "version": TOKEN_VERSION, "placeholder": self.placeholder,
            "clip_input": self.clip_input, "encoder": self.encoder, "mapper": dict(self.mapper.config),
            "training": self.training, "style_sha256": list(self.style_sha256), "source": self.source,
        }


def save_token(token: StyleToken, path: os.PathLike | str, *, overwrite: bool = False) -> Path:
    """Write `token` to the folder `path` (``mapper.safetensors`` + ``token.json``).

    Raises
    ------
    FileExistsError
        If the folder already holds a token and `overwrite` is False.

    Examples
    --------
    >>> import tempfile
    >>> token = StyleToken(StyleMapper(8, heads=2, dim_head=4))
    >>> folder = save_token(token, Path(tempfile.mkdtemp()) / "tok")
    >>> sorted(p.name for p in folder.iterdir())
    ['mapper.safetensors', 'provenance.json', 'token.json']
    >>> load_token(folder).describe()["mapper"]["dim"]
    8
    """
    from safetensors.torch import save_file

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder; a token is saved as a folder")
    if (folder / _CONFIG).exists() and not overwrite:
        raise FileExistsError(f"{folder} already holds a style token; pass overwrite=True to replace it")
    folder.mkdir(parents=True, exist_ok=True)
    io.remove_stale_parts(folder, names=(_WEIGHTS, _CONFIG))  # left by a killed save
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in token.mapper.state_dict().items()}
    _check_finite(state, f"the token to save in {folder}")
    with io.atomic_path(folder / _WEIGHTS, overwrite=True) as tmp:
        save_file(state, str(tmp), metadata={"format": TOKEN_FORMAT})
    io.write_json(folder / _CONFIG, token.describe(), overwrite=True)
    from .._provenance import record, write_into

    write_into(folder, record("save-token", parameters=token.describe()))
    return folder


def _check_finite(state: dict, what) -> None:
    """Refuse mapper weights holding NaN or infinite values (they give all-black images)."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{what} is not finite: NaN or infinite values in {', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}; it cannot be used")


def load_token(path: os.PathLike | str) -> StyleToken:
    """Read a token folder written by :func:`save_token` (or its ``token.json``).

    Raises
    ------
    FileNotFoundError
        If the folder or its files are missing.
    ValueError
        If ``token.json`` is not a token description (or lacks the mapper's
        settings), or the weights do not fit it or are not finite.
    """
    from safetensors.torch import load_file

    p = Path(path)
    folder = p.parent if p.is_file() else p
    if not (folder / _CONFIG).is_file() or not (folder / _WEIGHTS).is_file():
        if p.is_file() and p.suffix in (".pt", ".ckpt", ".bin"):
            raise ValueError(f"{p} is an official checkpoint; import it first with import_official_token "
                             "(cellsynth import-token)")
        raise FileNotFoundError(f"no style token at {p}: expected a folder with {_CONFIG} and {_WEIGHTS}")
    doc = io.read_json(folder / _CONFIG)
    if not isinstance(doc, dict) or doc.get("format") != TOKEN_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{folder / _CONFIG} is not a style token (format {found!r}, "
                         f"expected {TOKEN_FORMAT!r})")
    cfg = doc.get("mapper")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("heads"), int) or cfg["heads"] < 1:
        raise ValueError(f"{folder / _CONFIG} lacks the mapper's settings ('mapper' with a positive integer "
                         f"'heads', as save_token writes them), got {cfg!r}")
    io.require_memory(2.0 * (folder / _WEIGHTS).stat().st_size, what=f"loading {folder / _WEIGHTS}",
                      hint="a style token's weights are a few MB")
    try:
        state = load_file(str(folder / _WEIGHTS))
    except Exception as exc:  # safetensors' own error type for corrupt or truncated files
        raise ValueError(f"{folder / _WEIGHTS} is not a readable safetensors file: {io.first_line(exc)}") from exc
    _check_finite(state, folder / _WEIGHTS)
    try:
        mapper = StyleMapper.from_state_dict(state, heads=cfg["heads"], dropout=float(cfg.get("dropout", 0.05)))
    except (KeyError, RuntimeError, TypeError, ZeroDivisionError, AttributeError) as exc:
        raise ValueError(f"{folder / _WEIGHTS} does not hold a style mapper that fits {_CONFIG} "
                         f"({type(exc).__name__}: {io.first_line(exc)})") from exc
    return StyleToken(mapper=mapper, placeholder=doc.get("placeholder", "*"),
                      clip_input=doc.get("clip_input", "proper"), encoder=doc.get("encoder", ""),
                      training=doc.get("training", {}), style_sha256=doc.get("style_sha256", []),
                      source=doc.get("source", "trained"))


def image_sha256(image: np.ndarray) -> str:
    """SHA-256 of an image's shape, dtype and pixels (provenance of style images).

    Examples
    --------
    >>> image_sha256(np.zeros((2, 2), np.uint8)) == image_sha256(np.zeros((2, 2), np.uint8))
    True
    """
    a = np.ascontiguousarray(image)
    digest = hashlib.sha256(f"{a.shape}{a.dtype.str}".encode())
    digest.update(a.tobytes())
    return digest.hexdigest()


def clip_pixels(images: np.ndarray, *, clip_input: str = "proper") -> np.ndarray:
    """The uint8 RGB images that CLIP's image processor receives.

    Parameters
    ----------
    images : ndarray of shape (B, H, W, 3)
        Float images in [0, 1].
    clip_input : {"proper", "official-quirk"}
        ``"proper"`` rounds ``255 * x``. ``"official-quirk"`` reproduces the
        official code: the image mapped to [-1, 1] and cast to uint8 (truncation
        toward zero, -1 wrapping to 255), so CLIP sees an almost black image.

    Examples
    --------
    >>> x = np.array([0.0, 0.3, 0.5, 1.0]).reshape(1, 1, 4, 1).repeat(3, -1)
    >>> clip_pixels(x)[0, 0, :, 0].tolist()
    [0, 76, 128, 255]
    >>> clip_pixels(x, clip_input="official-quirk")[0, 0, :, 0].tolist()
    [255, 0, 0, 1]
    """
    if clip_input not in CLIP_INPUTS:
        raise ValueError(f"clip_input must be one of {CLIP_INPUTS}, got {clip_input!r}")
    x = np.clip(np.asarray(images, dtype=np.float64), 0.0, 1.0)
    if clip_input == "proper":
        return np.round(x * 255.0).astype(np.uint8)
    return (np.trunc(x * 2.0 - 1.0).astype(np.int64) % 256).astype(np.uint8)


def clip_view(rgb: np.ndarray, *, clip_input: str = "proper") -> np.ndarray:
    """The view of a style image CLIP is shown, the same in token training and in stylization.

    ``"proper"``: the image at its own size and aspect ratio (CLIP's processor
    then resizes its short side and centre-crops, as for any CLIP input).
    ``"official-quirk"``: the official code's view, the image squashed to 512x512
    (its uint8 cast is applied by :func:`clip_pixels`).

    Parameters
    ----------
    rgb : ndarray of shape (M, N, 3)
        Float RGB in [0, 1], before any working-size resizing.
    clip_input : {"proper", "official-quirk"}

    Returns
    -------
    ndarray of shape (M, N, 3) or (512, 512, 3)

    Examples
    --------
    >>> clip_view(np.zeros((40, 72, 3), np.float32)).shape
    (40, 72, 3)
    >>> clip_view(np.zeros((40, 72, 3), np.float32), clip_input="official-quirk").shape
    (512, 512, 3)
    """
    from ._image import to_working

    if clip_input not in CLIP_INPUTS:
        raise ValueError(f"clip_input must be one of {CLIP_INPUTS}, got {clip_input!r}")
    if clip_input == "official-quirk":
        return to_working(rgb, size=512, resize="squash")[0]
    return np.asarray(rgb, dtype=np.float32)


def clip_image_embeds(image_encoder, processor, images: np.ndarray, *, clip_input: str = "proper") -> torch.Tensor:
    """L2-normalised projected CLIP image embeddings of float RGB images in [0, 1].

    Parameters
    ----------
    image_encoder : transformers.CLIPVisionModelWithProjection
    processor : transformers.CLIPImageProcessor
    images : ndarray of shape (B, H, W, 3)
    clip_input : {"proper", "official-quirk"}

    Returns
    -------
    torch.Tensor of shape (B, projection_dim), float32, on the encoder's device.
    """
    pixels = clip_pixels(images, clip_input=clip_input)
    values = processor(images=list(pixels), return_tensors="pt").pixel_values
    param = next(image_encoder.parameters())
    with torch.no_grad():
        embeds = image_encoder(pixel_values=values.to(param.device, param.dtype)).image_embeds.float()
    return embeds / embeds.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def placeholder_id(tokenizer, placeholder: str) -> int:
    """The single token id of `placeholder`.

    Raises
    ------
    ValueError
        If the tokenizer splits it into several tokens.
    """
    ids = tokenizer(placeholder, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"placeholder {placeholder!r} must be a single token of the tokenizer, got ids {ids}")
    return int(ids[0])


@contextlib.contextmanager
def inject_token(text_encoder, token_id: int, vector: torch.Tensor) -> Iterator[None]:
    """Within the block, the input embedding of `token_id` is replaced by `vector`.

    The replacement happens on the token embeddings, before the position
    embeddings are added, as in InST; every other position is untouched.

    Parameters
    ----------
    text_encoder : transformers.CLIPTextModel
    token_id : int
    vector : torch.Tensor of shape (D,) or (B, D)
        One vector for all prompts, or one per prompt of the batch; gradients flow.
    """
    embedding = text_encoder.get_input_embeddings()

    def hook(module, args, output):
        ids = args[0] if args else None
        if ids is None:
            return output
        mask = ids == token_id
        if not bool(mask.any()):
            return output
        vec = vector.to(output.device, output.dtype)
        if vec.ndim == 1:
            vec = vec.expand(ids.shape[0], -1)
        rows = mask.nonzero(as_tuple=True)[0]
        output = output.clone()
        output[mask] = vec[rows]
        return output

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


