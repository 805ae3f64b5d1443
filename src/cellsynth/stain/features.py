"""Patch-feature backbones for NSC masks.

A backbone turns a batch of square fields of view (already resized to the input
size, intensities in [0, 1]) into a grid of patch feature vectors. Three exist:

- :class:`FilterBankBackbone` (``"filters"``): multi-scale Gaussian, gradient
  magnitude, Laplacian-of-Gaussian, structure-tensor and Hessian eigenvalue
  responses, averaged over each patch. No weights; numpy/scikit-image only.
- :class:`Dinov2Backbone` (``"dinov2-small"``): last hidden state of a
  transformers ``Dinov2Model``; the field of view is resized so that the model's
  own patch size gives the requested grid.
- :class:`TimmDinoBackbone` (``"dino-vits8"``): DINO ViT-S/8 through timm.
"""

from __future__ import annotations

import os
from typing import Optional, Protocol

import numpy as np

__all__ = ["Backbone", "FilterBankBackbone", "Dinov2Backbone", "TimmDinoBackbone", "make_backbone"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(Protocol):
    """What NSC needs from a feature extractor."""

    name: str

    def features(self, fovs: np.ndarray, grid: int) -> np.ndarray:
        """Patch features of shape (B, grid, grid, C) for fields of view of shape (B, S, S) in [0, 1]."""


def _pool(maps: np.ndarray, grid: int) -> np.ndarray:
    """Mean over square patches: (..., S, S) -> (..., grid, grid)."""
    s = maps.shape[-1]
    p = s // grid
    maps = maps[..., : grid * p, : grid * p]
    shape = maps.shape[:-2] + (grid, p, grid, p)
    return maps.reshape(shape).mean(axis=(-3, -1))


class FilterBankBackbone:
    """Multi-scale filter-bank features (no weights), as pixel classifiers use.

    Per pixel: the intensity smoothed at several scales, each encoded as a soft
    histogram over ``bins`` levels in [0, 1] (Gaussian bumps), so that the cosine
    similarity of two patches behaves like an intensity kernel; plus texture
    responses (gradient magnitude, Laplacian of Gaussian, structure-tensor and
    Hessian eigenvalues, scale-normalised and squashed by tanh) weighted by
    ``texture_weight``. Averaging over a patch turns the encoding into a soft
    intensity histogram of the patch.

    Parameters
    ----------
    sigmas : tuple of float
        Texture scales in input pixels.
    smooth : tuple of float
        Smoothing scales of the intensity encodings (0: none).
    bins : int
        Levels of the intensity encoding.
    texture_weight : float
        Weight of the texture block against the intensity block.

    Examples
    --------
    >>> fb = FilterBankBackbone(sigmas=(1.0, 2.0), smooth=(0.0,), bins=4)
    >>> fb.features(np.random.default_rng(0).random((2, 32, 32)), 4).shape
    (2, 4, 4, 16)
    """

    name = "filters"

    def __init__(self, sigmas: tuple = (1.0, 2.0, 4.0), smooth: tuple = (0.0, 1.0, 2.0), bins: int = 10,
                 texture_weight: float = 0.2) -> None:
        if not sigmas or any(s <= 0 for s in sigmas):
            raise ValueError(f"sigmas must be positive numbers, got {sigmas!r}")
        if not smooth or any(s < 0 for s in smooth):
            raise ValueError(f"smooth must be non-negative numbers, got {smooth!r}")
        if bins < 2:
            raise ValueError(f"bins must be >= 2, got {bins}")
        self.sigmas = tuple(float(s) for s in sigmas)
        self.smooth = tuple(float(s) for s in smooth)
        self.bins = int(bins)
        self.texture_weight = float(texture_weight)

    def pixel_features(self, image: np.ndarray) -> np.ndarray:
        """Feature maps of shape (C, S, S) of one image with values in [0, 1]."""
        from scipy import ndimage as ndi
        from skimage.feature import hessian_matrix, hessian_matrix_eigvals, structure_tensor, structure_tensor_eigenvalues

        img = np.asarray(image, dtype=np.float32)
        centres = np.linspace(0.0, 1.0, self.bins, dtype=np.float32)
        width = np.float32(1.0 / (self.bins - 1))
        maps = []
        for s in self.smooth:
            g = ndi.gaussian_filter(img, s) if s > 0 else img
            enc = np.exp(-0.5 * ((g[None] - centres[:, None, None]) / width) ** 2)
            maps.append(enc / np.sqrt(len(self.smooth) * self.bins))
        tex = []
        for s in self.sigmas:
            tex.append(ndi.gaussian_gradient_magnitude(img, s) * s)
            tex.append(-ndi.gaussian_laplace(img, s) * s * s)
            st = structure_tensor_eigenvalues(structure_tensor(img, sigma=s, order="rc"))
            tex.extend(np.sqrt(np.maximum(st, 0)) * s)
            he = hessian_matrix_eigvals(hessian_matrix(img, sigma=s, order="rc", use_gaussian_derivatives=False))
            tex.extend(he * s * s)
        tex = np.tanh(3.0 * np.stack(tex)) * (self.texture_weight / np.sqrt(len(tex)))
        return np.concatenate(maps + [tex]).astype(np.float32)

    def features(self, fovs: np.ndarray, grid: int) -> np.ndarray:
        fovs = np.asarray(fovs, dtype=np.float32)
        if fovs.ndim != 3 or fovs.shape[1] != fovs.shape[2]:
            raise ValueError(f"fields of view must have shape (B, S, S), got {fovs.shape}")
        out = np.stack([_pool(self.pixel_features(f), grid) for f in fovs])  # (B, C, g, g)
        return np.moveaxis(out, 1, -1)


def _to_rgb_tensor(fovs: np.ndarray, size: int, mean, std, device, dtype):
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(np.asarray(fovs, dtype=np.float32))[:, None]
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.repeat(1, 3, 1, 1)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - m) / s).to(device=device, dtype=dtype)


def _check_loaded(folder, missing: list, mismatched: list) -> None:
    """Refuse a weights folder that left part of the backbone randomly initialised."""
    if missing or mismatched:
        names = [str(k) for k in list(missing)[:3]] + [str(k[0]) for k in list(mismatched)[:3]]
        raise ValueError(f"{folder} does not hold weights of this backbone: {len(missing)} tensors missing and "
                         f"{len(mismatched)} of another shape (e.g. {', '.join(names)}); they would be random. "
                         "Pass a folder with the backbone's own weights")


class Dinov2Backbone:
    """DINOv2 patch features from transformers ``Dinov2Model``.

    Parameters
    ----------
    model : transformers.Dinov2Model, optional
        A ready model (tests pass a tiny random one). When omitted, ``weights`` is
        resolved with :func:`cellsynth.weights.resolve` and loaded from safetensors.
    weights : str or path-like
        Registry name or local folder; default ``"dinov2-small"``.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` ...
    offline : bool, optional
        Passed to the resolver.
    """

    name = "dinov2-small"

    def __init__(self, model=None, *, weights: str | os.PathLike = "dinov2-small", device: str = "auto",
                 offline: Optional[bool] = None, progress=None) -> None:
        import torch

        from ..device import resolve_device

        self.device = resolve_device(device)
        self.mean, self.std = _IMAGENET_MEAN, _IMAGENET_STD
        if model is None:
            from transformers import Dinov2Model

            from ..weights import resolve

            folder = resolve(weights, offline=offline, progress=progress)
            model, info = Dinov2Model.from_pretrained(folder, use_safetensors=True, output_loading_info=True)
            _check_loaded(folder, info.get("missing_keys", []), info.get("mismatched_keys", []))
            self.name = str(weights) if str(weights) in ("dinov2-small",) else f"dinov2:{folder.name}"
            cfg = folder / "preprocessor_config.json"
            if cfg.is_file():
                from ..io import read_json

                pre = read_json(cfg)
                self.mean = tuple(pre.get("image_mean", self.mean))
                self.std = tuple(pre.get("image_std", self.std))
        self.model = model.to(self.device).eval()
        self.dtype = next(self.model.parameters()).dtype
        self.patch_size = int(self.model.config.patch_size)
        self._torch = torch

    def features(self, fovs: np.ndarray, grid: int) -> np.ndarray:
        torch = self._torch
        x = _to_rgb_tensor(fovs, grid * self.patch_size, self.mean, self.std, self.device, self.dtype)
        with torch.inference_mode():
            hidden = self.model(pixel_values=x).last_hidden_state
        tokens = hidden[:, -grid * grid:]  # drop the class (and register) tokens
        return tokens.float().reshape(len(x), grid, grid, -1).cpu().numpy()


class TimmDinoBackbone:
    """DINO ViT-S/8 patch features through timm (the backbone of the public NSC code).

    Parameters
    ----------
    model : timm VisionTransformer, optional
        A ready model; otherwise ``weights`` is resolved and loaded from safetensors.
    """

    name = "dino-vits8"

    def __init__(self, model=None, *, weights: str | os.PathLike = "dino-vits8", device: str = "auto",
                 offline: Optional[bool] = None, progress=None) -> None:
        import torch

        from ..device import resolve_device

        self.device = resolve_device(device)
        if model is None:
            import timm

            from ..weights import resolve

            folder = resolve(weights, offline=offline, progress=progress)
            try:
                model = timm.create_model(
                    "vit_small_patch8_224", pretrained=True, dynamic_img_size=True,
                    pretrained_cfg_overlay={"file": str(folder / "model.safetensors")},
                )
            except RuntimeError as exc:  # load_state_dict(strict=True): missing, unexpected or mis-sized weights
                raise ValueError(f"{folder} does not hold DINO ViT-S/8 weights: {str(exc)[:300]}") from None
        self.model = model.to(self.device).eval()
        self.dtype = next(self.model.parameters()).dtype
        self.patch_size = int(self.model.patch_embed.patch_size[0])
        self._torch = torch

    def features(self, fovs: np.ndarray, grid: int) -> np.ndarray:
        torch = self._torch
        x = _to_rgb_tensor(fovs, grid * self.patch_size, _IMAGENET_MEAN, _IMAGENET_STD, self.device, self.dtype)
        with torch.inference_mode():
            tokens = self.model.forward_features(x)
        tokens = tokens[:, -grid * grid:]
        return tokens.float().reshape(len(x), grid, grid, -1).cpu().numpy()


def make_backbone(name: str = "filters", *, device: str = "auto", offline: Optional[bool] = None,
                  weights: Optional[str | os.PathLike] = None, progress=None) -> Backbone:
    """Build a backbone by name (``"filters"``, ``"dinov2-small"``, ``"dino-vits8"``).

    ``weights`` overrides the registry name with a local folder.

    Examples
    --------
    >>> make_backbone("filters").name
    'filters'
    """
    if name == "filters":
        return FilterBankBackbone()
    if name == "dinov2-small":
        return Dinov2Backbone(weights=weights or name, device=device, offline=offline, progress=progress)
    if name == "dino-vits8":
        return TimmDinoBackbone(weights=weights or name, device=device, offline=offline, progress=progress)
    raise ValueError(f"unknown backbone {name!r}; expected 'filters', 'dinov2-small' or 'dino-vits8'")
