"""Virtual staining pipeline: brightfield -> fluorescence channels, with NSC mask guidance.

Conditional pixel-space diffusion (DiffStain / Palette): at every step the UNet
sees the brightfield planes concatenated with the current noisy channels. The
whole image is denoised at once in overlapping tiles: at each step the model's
output on every tile is blended (linear ramps over the overlaps) into one
full-size prediction and the scheduler steps the full image, so tiles never
disagree at a seam, and any image size works.

Mask guidance (DiffStain eq. 2): the sampler starts at ``guidance_strength`` of
the schedule from ``sqrt(abar_t) z + sqrt(1 - abar_t) eps``, where ``z`` is the
NSC mask of each channel scaled into the model's target space (background and
foreground levels from the model config, not 0/255). Without given masks, a
first unguided pass produces channels whose NSC masks start the guided rounds;
each further ``refine`` round recomputes the masks on the previous result.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .. import io
from ..progress import ProgressCallback, report
from .params import NSCParams, StainParams
from .tiling import blend_window, tile_origins

__all__ = ["StainPipeline", "StainOutput", "load_stain_model"]


@dataclass
class StainOutput:
    """Result of :class:`StainPipeline`.

    Attributes
    ----------
    images : ndarray of shape (C, M, N), float32
        Virtual channels as normalised intensity in [0, 1] (the model's 2-98
        percentile scale).
    channel_names, colormaps : list of str
    masks : list of ndarray of shape (C, M, N), uint8
        The masks that started each guided round (empty without guidance).
    model_evaluations : int
        UNet calls per tile, over all rounds.
    """

    images: np.ndarray
    channel_names: list
    colormaps: list
    masks: list = field(default_factory=list)
    model_evaluations: int = 0


def _depth(top: float, dtype=None) -> str:
    """How a person names an intensity scale: '8-bit (0-255)', '16-bit', 'floating point'..."""
    if dtype is not None and np.issubdtype(dtype, np.floating):
        return "floating point"
    if dtype is not None and np.issubdtype(dtype, np.integer):
        return f"{np.dtype(dtype).itemsize * 8}-bit"
    for bits in (8, 12, 16):
        if top <= 2 ** bits - 1:
            return f"{bits}-bit"
    return "of more than 16 bits"


class StainPipeline:
    """Brightfield planes -> fluorescence channels with a conditional ``UNet2DModel``.

    Parameters
    ----------
    unet : diffusers.UNet2DModel
        Input channels: condition planes then target channels.
    config : StainModelConfig
    source : dict, optional
        Where the weights came from (provenance).
    """

    @classmethod
    def from_pretrained(cls, path: os.PathLike | str = "default", *, device: str = "auto",
                        dtype=None) -> "StainPipeline":
        """A pipeline from a staining model folder (``"default"``: the shipped demo model); see
        :func:`load_stain_model`."""
        return load_stain_model(path, device=device, dtype=dtype)

    def __init__(self, unet, config, *, source: Optional[dict] = None, training: Optional[dict] = None) -> None:
        self.unet = unet
        self.config = config
        self.source = dict(source or {"name": "in-memory"})
        self.training = training

    @property
    def device(self):
        return next(self.unet.parameters()).device

    @property
    def dtype(self):
        return next(self.unet.parameters()).dtype

    def make_scheduler(self, params: StainParams):
        """A diffusers scheduler for ``params`` with its timesteps set."""
        from diffusers import DDIMScheduler, DDPMScheduler

        cfg = self.config.scheduler_config()
        if params.scheduler == "ddim":
            sched = DDIMScheduler(**cfg, set_alpha_to_one=False, timestep_spacing="trailing")
            sched.set_timesteps(min(params.steps, self.config.num_train_timesteps))
        else:
            sched = DDPMScheduler(**cfg, variance_type="fixed_small")
            sched.set_timesteps(self.config.num_train_timesteps)
        return sched

    def _check(self, brightfield) -> np.ndarray:
        x = np.asarray(brightfield)
        if x.ndim == 2 and self.config.n_condition == 1:
            x = x[None]
        if x.ndim != 3 or x.shape[0] != self.config.n_condition:
            raise ValueError(
                f"brightfield must have shape ({self.config.n_condition}, M, N) for planes "
                f"{self.config.brightfield_names}, got {x.shape}"
            )
        if min(x.shape[1:]) < 1 or not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
            raise ValueError(f"brightfield must be a non-empty array of real numbers, got dtype {x.dtype}, "
                             f"shape {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("brightfield holds NaN or infinite values")
        self._check_range(x)
        return x

    def _check_range(self, x: np.ndarray) -> None:
        """Refuse planes lying wholly outside the model's intensity range: every pixel would clip to one value."""
        norm = self.config.condition_norm
        for name, plane, low, high in zip(self.config.brightfield_names, x, norm["low"], norm["high"]):
            lo, hi = plane.min(), plane.max()
            if hi <= low or lo >= high:
                raise ValueError(
                    f"this model expects brightfield {_depth(high)} (its training images span {low:g}-{high:g}); "
                    f"plane {name!r} of this image is {_depth(hi, plane.dtype)} ({lo:g}-{hi:g}), so every pixel "
                    "would become one value: stain images from the camera and bit depth the model was trained on, "
                    "or train a model on yours")

    def _mask_to_target(self, masks: np.ndarray):
        import torch

        levels = np.asarray(self.config.mask_levels, np.float32)
        z = levels[:, 0, None, None] + masks.astype(np.float32) * (levels[:, 1] - levels[:, 0])[:, None, None]
        return torch.from_numpy(z)

    def _denoise(self, cond, start, t_start_index: int, sched, params: StainParams, generator, progress, round_i,
                 rounds) -> "object":
        """Run the scheduler from ``start`` (full padded image) with tiled model calls."""
        import torch

        tile = self.tile_size(params, cond.shape[-2:])
        overlap = min(params.overlap, tile // 2)
        origins = tile_origins(tuple(cond.shape[-2:]), tile, overlap)
        window = torch.from_numpy(blend_window(tile, overlap if len(origins) > 1 else 0))
        weight = torch.zeros(cond.shape[-2:])
        for r, c in origins:
            weight[r:r + tile, c:c + tile] += window
        timesteps = sched.timesteps[t_start_index:]
        y = start
        dev, dt = self.device, self.dtype
        for i, t in enumerate(timesteps):
            out = torch.zeros_like(y)
            for b in range(0, len(origins), params.batch_size):
                chunk = origins[b:b + params.batch_size]
                xin = torch.stack([torch.cat([cond[:, r:r + tile, c:c + tile], y[:, r:r + tile, c:c + tile]])
                                   for r, c in chunk])
                with torch.inference_mode():
                    pred = self.unet(xin.to(dev, dt), t.to(dev)).sample.float().cpu()
                for (r, c), p in zip(chunk, pred):
                    out[:, r:r + tile, c:c + tile] += p * window
            out /= weight
            y = sched.step(out, t, y, generator=generator, **({"eta": params.eta} if params.scheduler == "ddim" else {})
                           ).prev_sample
            report(progress, "denoise", i + 1, len(timesteps), f"round {round_i + 1}/{rounds}: step {i + 1}/{len(timesteps)}")
        return y, len(timesteps)

    def _check_memory(self, planes: int, m: int, n: int, params: StainParams) -> None:
        """Refuse a field of view whose full-size arrays cannot fit in the memory free now."""
        from ..io import require_memory

        c = self.config.n_target
        # float32 full-size arrays: condition, noise, sample, model output, blend weights, the
        # scheduler's copies and the result (about 6 per target channel), plus one batch of tiles.
        tile = params.tile or self.config.sample_size
        need = 4.0 * m * n * (planes + 6 * c + 2) + 4.0 * 64 * (planes + c) * tile * tile
        require_memory(need, what=f"staining a {m} x {n} field of view into {c} channels",
                       hint="stain a crop or tiles of the image one at a time")

    def tile_size(self, params: StainParams, shape) -> int:
        tile = params.tile or self.config.sample_size
        f = self.config.factor
        tile = max(f, tile // f * f)
        return min(tile, min(shape))

    def __call__(
        self,
        brightfield: np.ndarray,
        *,
        params: Optional[StainParams] = None,
        masks: Optional[np.ndarray] = None,
        nsc_params: Optional[NSCParams] = None,
        backbone=None,
        progress: Optional[ProgressCallback] = None,
    ) -> StainOutput:
        """Stain one field of view.

        Parameters
        ----------
        brightfield : ndarray of shape (B, M, N)
            Raw condition planes (B as in the model config; (M, N) for one plane).
        params : StainParams, optional
        masks : ndarray of shape (C, M, N), optional
            Masks (0/1) that start the first guided round; by default NSC masks of
            an unguided first pass.
        nsc_params : NSCParams, optional
            NSC settings for masks computed here (default: filter bank, k = 5).
        backbone : optional
            NSC backbone (default from ``nsc_params.backbone``).
        progress : ProgressCallback, optional
            One event per denoising step (stage ``"denoise"``) and per NSC field of
            view (stage ``"nsc"``); may raise Cancelled.

        Returns
        -------
        StainOutput
        """
        import torch

        from .model import denormalise, normalise
        from .nsc import nsc_channels

        # 1. check inputs
        params = params or StainParams()
        if not isinstance(params, StainParams):
            raise TypeError(f"params must be a StainParams, got {type(params).__name__}")
        x = self._check(brightfield)
        m, n = x.shape[1:]
        cfg = self.config
        self._check_memory(x.shape[0], m, n, params)
        if masks is not None:
            masks = np.asarray(masks)
            if masks.shape != (cfg.n_target, m, n):
                raise ValueError(f"masks must have shape {(cfg.n_target, m, n)}, got {masks.shape}")
            masks = (masks > 0).astype(np.uint8)

        # 2. prepare: normalise, pad to a multiple of the UNet factor and at least one tile
        cond = normalise(x, cfg.condition_norm)
        f = cfg.factor
        pm, pn = -m % f, -n % f  # also lifts a side shorter than f to f
        if pm or pn:
            mode = "reflect" if pm < m and pn < n else "edge"
            cond = np.pad(cond, ((0, 0), (0, pm), (0, pn)), mode=mode)
        cond_t = torch.from_numpy(np.ascontiguousarray(cond))
        shape = (cfg.n_target,) + cond.shape[1:]
        generator = torch.Generator().manual_seed(params.seed)
        noise = torch.randn(shape, generator=generator)

        def pad(a):
            return np.pad(a, ((0, 0), (0, pm), (0, pn)), mode="edge") if (pm or pn) else a

        # 3. set timesteps
        sched = self.make_scheduler(params)
        n_steps = len(sched.timesteps)
        t_index = min(n_steps - 1, int(round(n_steps * (1.0 - params.guidance_strength))))

        # 4. denoising rounds
        rounds = (params.refine + (masks is None)) if params.guidance else 1
        used_masks, evaluations, y = [], 0, None
        nsc_params = nsc_params or NSCParams()
        for round_i in range(rounds):
            guided = params.guidance and (round_i > 0 or masks is not None)
            if guided:
                if round_i > 0 or masks is None:
                    unit = denormalise(y[:, :m, :n].numpy(), cfg.target_norm)
                    masks = np.stack([r.foreground for r in nsc_channels(
                        unit, params=nsc_params, backbone=backbone, progress=progress)]).astype(np.uint8)
                used_masks.append(masks)
                z = self._mask_to_target(pad(masks))
                t0 = sched.timesteps[t_index]
                eps = torch.randn(shape, generator=generator)
                start = sched.add_noise(z[None], eps[None], t0[None])[0]
                sched = self.make_scheduler(params)
                y, k = self._denoise(cond_t, start, t_index, sched, params, generator, progress, round_i, rounds)
            else:
                y, k = self._denoise(cond_t, noise * sched.init_noise_sigma, 0, sched, params, generator, progress,
                                     round_i, rounds)
                sched = self.make_scheduler(params)
            evaluations += k

        # 5. decode: model space -> [0, 1]
        images = denormalise(y[:, :m, :n].numpy(), cfg.target_norm)
        if not np.all(np.isfinite(images)):
            raise ValueError(f"the staining model ({self.source.get('name')}) produced NaN or infinite values; "
                             "its weights or this input are unusable")
        return StainOutput(images=images, channel_names=list(cfg.channel_names), colormaps=list(cfg.colormaps),
                           masks=used_masks, model_evaluations=evaluations)


def load_stain_model(path: os.PathLike | str = "default", *, device: str = "auto", dtype=None) -> "StainPipeline":
    """Load a staining model folder as a :class:`StainPipeline` (also :meth:`StainPipeline.from_pretrained`).

    Parameters
    ----------
    path : path-like or "default"
        A folder with ``config.json`` and ``model.safetensors``; ``"default"`` is
        the shipped demo model.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` ...
    dtype : torch.dtype, optional
        Default: :func:`cellsynth.device.default_dtype` of the device.

    Raises
    ------
    FileNotFoundError
        If the folder or its files are missing.
    ValueError
        If ``config.json`` is not a staining model's.
    """
    import torch
    from safetensors.torch import load_file

    from ..device import default_dtype, resolve_device
    from .model import FORMAT, StainModelConfig, _check_finite, build_unet, default_model_dir

    folder = default_model_dir() if str(path) == "default" else Path(path)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder} is not a staining model folder; expected config.json and model.safetensors")
    doc = io.read_json(folder / "config.json")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{folder / 'config.json'} is not a staining model configuration (format {FORMAT!r})")
    try:
        config = StainModelConfig.from_dict(doc["config"])
        unet = build_unet(config)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError) as exc:
        raise ValueError(f"{folder / 'config.json'} does not describe a staining model that can be built "
                         f"({type(exc).__name__}: {io.first_line(exc)})") from exc
    weights = folder / "model.safetensors"
    io.require_memory(2.0 * weights.stat().st_size, what=f"loading the weights in {weights}",
                      hint="is this really a staining model folder?")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors' own error type for corrupt or truncated files
        raise ValueError(f"{weights} is not a readable safetensors weights file: {io.first_line(exc)}") from exc
    _check_finite(state, str(weights))
    try:
        unet.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as exc:
        raise ValueError(f"weights in {weights} do not fit its config.json: "
                         f"{io.state_dict_mismatch(unet.state_dict(), state)}") from exc
    dev = resolve_device(device)
    dtype = dtype or default_dtype(dev)
    unet = (unet.to(dev) if dtype == torch.float32 else unet.to(dev, dtype)).eval()
    from ..weights import file_sha256

    source = {"path": str(folder), "sha256": file_sha256(folder / "model.safetensors"),
              "name": "stain-demo" if folder.resolve() == default_model_dir().resolve() else folder.name}
    return StainPipeline(unet, config, source=source, training=doc.get("training"))
