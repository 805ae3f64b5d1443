"""Training a style token: only the mapper learns, on eps-MSE of SD latents.

VAE latents (posterior mean and std of each style image and its flip) and CLIP
image embeddings are computed once and cached; each step samples a latent from
the cached posterior, a timestep ``t ~ U[0, 1000)`` and noise, injects the
mapped token for the placeholder and regresses the UNet's noise prediction.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import io
from ..device import training_precision
from ..progress import ProgressCallback, report
from ._image import to_unit_rgb, to_working
from .mapper import StyleMapper
from .params import TrainParams
from .tokens import StyleToken, clip_image_embeds, clip_view, image_sha256, inject_token, load_token, placeholder_id, save_token

__all__ = ["train_token", "TrainResult", "token_loss", "default_mapper"]


@dataclass
class TrainResult:
    """Result of :func:`train_token`.

    Attributes
    ----------
    token : StyleToken
    losses : list of float
        Loss of every step (including steps restored from a checkpoint).
    seconds_per_step : float
        Mean wall time of the steps run in this call.
    resumed_from : int
        Step restored from a checkpoint (0 when starting fresh).
    precision : dict
        The precision policy of the steps (:func:`cellsynth.device.training_precision`).
    """

    token: StyleToken
    losses: list = field(default_factory=list)
    seconds_per_step: float = 0.0
    resumed_from: int = 0
    precision: dict = field(default_factory=dict)


def default_mapper(dim: int) -> StyleMapper:
    """The official mapper (8 heads x 64, dropout 0.05) for width 768; a scaled one otherwise."""
    if dim == 768:
        return StyleMapper(768, heads=8, dim_head=64, dropout=0.05)
    return StyleMapper(dim, heads=2, dim_head=max(4, dim // 4), dropout=0.05)


class _Data:
    """Style images prepared once: square working images, cached latents and embeddings."""

    def __init__(self, pipe, styles, params: TrainParams, device) -> None:
        self.pipe, self.params, self.device = pipe, params, device
        self.images, self.clip_views = [], []  # squashed working images for the VAE; CLIP's own view
        for s in styles:
            rgb, _ = to_unit_rgb(s)
            work, _ = to_working(rgb, size=params.size, resize="squash")
            view = clip_view(rgb, clip_input=params.clip_input)  # as stylization shows it to CLIP
            self.images.append(work)
            self.clip_views.append(view)
            if params.flip:
                self.images.append(np.ascontiguousarray(work[:, ::-1]))
                self.clip_views.append(np.ascontiguousarray(view[:, ::-1]))
        self.cached = None
        if params.cache:
            self.cached = [self._encode(i) for i in range(len(self.images))]

    def __len__(self) -> int:
        return len(self.images)

    @torch.no_grad()
    def _encode(self, i: int):
        pipe, img = self.pipe, self.images[i]
        dist = pipe._posterior(img, self.device)
        sf = pipe.vae.config.scaling_factor
        embeds = clip_image_embeds(pipe.image_encoder, pipe.feature_extractor, self.clip_views[i][None],
                                   clip_input=self.params.clip_input)
        return dist.mean * sf, dist.std * sf, embeds

    def sample(self, i: int, generator: torch.Generator):
        mean, std, embeds = self.cached[i] if self.cached is not None else self._encode(i)
        eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device, mean.dtype)
        return mean + std * eps, embeds


def _step_loss(pipe, mapper, token_id, ids, latent, embeds, t, noise, amp_dtype=None):
    noisy = pipe.scheduler.add_noise(latent, noise, t)
    with torch.autocast(latent.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        vector = mapper(embeds.float())
        with inject_token(pipe.text_encoder, token_id, vector):
            cond = pipe.text_encoder(ids)[0]
        eps = pipe.unet(noisy, t, encoder_hidden_states=cond.to(pipe.unet.dtype)).sample
    return torch.nn.functional.mse_loss(eps.float(), noise.float())


def token_loss(pipe, token: StyleToken, styles: Sequence[np.ndarray], *, size: int = 512, n: int = 8,
               seed: int = 0) -> float:
    """Mean eps-MSE of `token` on `styles` over `n` fixed (seeded) timesteps and noises.

    A fixed evaluation of the training objective (mapper in eval mode), to
    compare tokens before and after training.
    """
    params = TrainParams(size=size, flip=False, clip_input=token.clip_input)
    device = pipe._execution_device
    data = _Data(pipe, styles, params, device)
    token_id = placeholder_id(pipe.tokenizer, token.placeholder)
    ids = _prompt_ids(pipe, token.placeholder, device)
    mapper = token.mapper.to(device, torch.float32).eval()
    g = torch.Generator("cpu").manual_seed(seed)
    losses = []
    with torch.no_grad():
        for k in range(n):
            latent, _, embeds = data.cached[k % len(data)]  # the posterior mean: fixed
            t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (1,), generator=g).to(device)
            noise = torch.randn(latent.shape, generator=g).to(device, latent.dtype)
            losses.append(float(_step_loss(pipe, mapper, token_id, ids, latent, embeds, t, noise)))
    return float(np.mean(losses))


def _prompt_ids(pipe, placeholder: str, device) -> torch.Tensor:
    return pipe.tokenizer(placeholder, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids.to(device)


def train_token(
    styles: Sequence[np.ndarray],
    pipe,
    *,
    params: Optional[TrainParams] = None,
    token: Optional[StyleToken] = None,
    encoder: str = "clip-vit-large-patch14",
    checkpoint_dir: os.PathLike | str | None = None,
    progress: Optional[ProgressCallback] = None,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> TrainResult:
    """Learn a style token from one or more style images.

    Parameters
    ----------
    styles : sequence of ndarray of shape (M, N) or (M, N, 3)
        Style images (any size; each is squashed to ``params.size`` for the VAE, and
        shown to CLIP as stylization shows it, see :func:`~cellsynth.stylize.tokens.clip_view`).
    pipe : InSTPipeline
        Frozen SD components and CLIP image encoder (nothing but the mapper trains).
    params : TrainParams, optional
    token : StyleToken, optional
        A token to continue from (its mapper is trained in place); default a new
        mapper of the text encoder's width.
    encoder : str
        Name of the image encoder, recorded in the token.
    checkpoint_dir : path-like, optional
        Folder for checkpoints every ``params.checkpoint_every`` steps; a
        checkpoint of the same settings and images found there is resumed.
    progress : ProgressCallback, optional
        Stage ``"train"``, once per step with the loss; may raise ``Cancelled``
        (the last checkpoint stays on disk).
    on_step : callable(step, loss), optional
        Called after every step (e.g. to draw a loss curve).

    Returns
    -------
    TrainResult

    Raises
    ------
    ValueError
        No style images, or a token that does not fit the model.
    """
    # 1. Check inputs
    params = params or TrainParams()
    styles = [np.asarray(s) for s in styles]
    if not styles:
        raise ValueError("train_token needs at least one style image")
    device = pipe._execution_device
    width = pipe.text_encoder.config.hidden_size
    if token is None:
        torch.manual_seed(params.seed)
        token = StyleToken(default_mapper(width), clip_input=params.clip_input, encoder=encoder)
    if token.dim != width:
        raise ValueError(f"token width {token.dim} does not fit the text encoder width {width}")
    token_id = placeholder_id(pipe.tokenizer, token.placeholder)
    hashes = [image_sha256(s) for s in styles]
    settings = {"params": params.to_dict(), "style_sha256": hashes}

    # 2. Prepare: frozen models, cached latents and embeddings, optimiser, checkpoint
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.image_encoder):
        module.requires_grad_(False)
        module.eval()
    data = _Data(pipe, styles, params, device)
    ids = _prompt_ids(pipe, token.placeholder, device)
    mapper = token.mapper.to(device, torch.float32)
    mapper.requires_grad_(True)
    optimizer = torch.optim.AdamW(mapper.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay)
    losses: list = []
    start = 0
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None and (ckpt / "state.json").is_file():
        state = io.read_json(ckpt / "state.json")
        if state.get("settings") == settings:
            restored = load_token(ckpt / "token")
            mapper.load_state_dict(restored.mapper.state_dict())
            optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
            losses, start = list(state["losses"]), int(state["step"])
    precision = training_precision(device, pipe.unet.dtype, mixed_precision=params.mixed_precision)
    amp_dtype = precision.autocast_dtype
    scaler = torch.amp.GradScaler(device.type) if precision.grad_scaler else None

    # 3. Loop with progress
    rng = np.random.default_rng([params.seed, 1])
    order = rng.integers(0, len(data), size=params.steps)
    t0 = time.perf_counter()
    mapper.train()
    for step in range(start, params.steps):
        g = torch.Generator("cpu").manual_seed(params.seed * 1_000_003 + step)
        latent, embeds = data.sample(int(order[step]), g)
        t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (1,), generator=g).to(device)
        noise = torch.randn(latent.shape, generator=g).to(device, latent.dtype)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(params.seed * 1_000_003 + step)  # dropout masks: resumable runs repeat exactly
            loss = _step_loss(pipe, mapper, token_id, ids, latent, embeds, t, noise, amp_dtype)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, losses[-1])
        if ckpt is not None and params.checkpoint_every and (step + 1) % params.checkpoint_every == 0:
            _checkpoint(ckpt, token, optimizer, step + 1, losses, settings)
        report(progress, "train", step + 1, params.steps, f"loss {losses[-1]:.4f}")
    ran = params.steps - start
    seconds = (time.perf_counter() - t0) / ran if ran else 0.0
    mapper.eval()

    # 4. Return the token with its training record
    token.mapper = mapper
    token.style_sha256 = hashes
    token.training = {**params.to_dict(), "final_loss": float(np.mean(losses[-20:])) if losses else None,
                      "n_styles": len(styles), "precision": precision.describe()}
    token.source = "trained"
    if ckpt is not None:
        _checkpoint(ckpt, token, optimizer, params.steps, losses, settings)
    return TrainResult(token=token, losses=losses, seconds_per_step=seconds, resumed_from=start,
                       precision=precision.describe())


def _checkpoint(folder: Path, token: StyleToken, optimizer, step: int, losses: list, settings: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_token(token, folder / "token", overwrite=True)
    with io.atomic_path(folder / "optimizer.pt", overwrite=True) as tmp:
        torch.save(optimizer.state_dict(), tmp)
    io.write_json(folder / "state.json", {"step": step, "losses": losses, "settings": settings}, overwrite=True)
