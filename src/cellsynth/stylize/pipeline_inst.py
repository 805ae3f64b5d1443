"""The InST stylization pipeline on diffusers' Stable Diffusion v1 components.

:class:`InSTPipeline` extends diffusers' ``StableDiffusionImg2ImgPipeline`` (same
components, with ``image_encoder`` = CLIPVisionModelWithProjection and
``feature_extractor`` = CLIPImageProcessor for the style image) and replaces its
``__call__`` with InST inference: latent AdaIN, style-token conditioning,
stochastic inversion and DDIM with classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

from ..device import oom_guard
from ..progress import ProgressCallback, report
from ._image import from_unit_rgb, from_working, to_unit_rgb, to_working
from .adain import latent_adain
from .params import StylizeParams
from .tokens import StyleToken, clip_image_embeds, clip_view, image_sha256, inject_token, placeholder_id

__all__ = ["InSTPipeline", "InSTOutput", "inst_scheduler", "INST_SCHEDULER_CONFIG", "start_timesteps"]

INST_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}
"""DDIM as the official InST code runs it (scaled-linear betas, eta 0, offset 1)."""


def inst_scheduler(name: str = "ddim"):
    """A scheduler on InST's noise schedule: the paper's DDIM, or a few-step multistep solver.

    ``"dpmsolver++"`` is diffusers' DPMSolverMultistepScheduler (second order,
    DPM-Solver++), ``"unipc"`` its UniPCMultistepScheduler; both share DDIM's
    betas and timestep spacing, so a strength means the same start timestep.

    Examples
    --------
    >>> s = inst_scheduler(); s.set_timesteps(50)
    >>> s.timesteps[:3].tolist(), s.timesteps[-1].item()
    ([981, 961, 941], 1)
    >>> type(inst_scheduler("dpmsolver++")).__name__, inst_scheduler("dpmsolver++").config.algorithm_type
    ('DPMSolverMultistepScheduler', 'dpmsolver++')
    """
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    ddim = DDIMScheduler(**INST_SCHEDULER_CONFIG)
    if name == "ddim":
        return ddim
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(ddim.config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "unipc":
        return UniPCMultistepScheduler.from_config(ddim.config)
    raise ValueError(f"scheduler must be 'ddim', 'dpmsolver++' or 'unipc', got {name!r}")


def start_timesteps(strength: float, num_inference_steps: int, *, num_train_timesteps: int = 1000) -> tuple:
    """The inversion timestep and the first DDIM timestep of a run (None if no step runs).

    Examples
    --------
    >>> start_timesteps(0.7, 50)
    (700, 681)
    >>> start_timesteps(0.01, 50)
    (10, None)
    """
    scheduler = inst_scheduler()
    scheduler.set_timesteps(num_inference_steps)
    n = min(int(num_inference_steps * strength), num_inference_steps)
    first = int(scheduler.timesteps[num_inference_steps - n]) if n else None
    return min(int(num_train_timesteps * strength), num_train_timesteps - 1), first


@dataclass
class InSTOutput:
    """Result of :class:`InSTPipeline`.

    Attributes
    ----------
    image : ndarray of shape (M, N) or (M, N, 3)
        The stylized image, in the content's shape, dtype and value range.
    metadata : dict
        Provenance: parameters, timesteps, working size, token description, hashes.
    latents : torch.Tensor or None
        The final latent (when ``return_latents=True``).
    """

    image: np.ndarray
    metadata: dict = field(default_factory=dict)
    latents: Optional[torch.Tensor] = None


class InSTPipeline(StableDiffusionImg2ImgPipeline):
    """Inversion-based style transfer (InST) with a learned style token.

    Components are those of Stable Diffusion v1 (``vae``, ``text_encoder``,
    ``tokenizer``, ``unet``, ``scheduler``) plus ``image_encoder``
    (CLIPVisionModelWithProjection) and ``feature_extractor`` (CLIPImageProcessor)
    for the style image. The scheduler should be :func:`inst_scheduler`.
    """

    @torch.no_grad()
    def __call__(
        self,
        content: np.ndarray,
        style: np.ndarray,
        token: StyleToken,
        *,
        strength: float = 0.7,
        num_inference_steps: int = 50,
        guidance_scale: float = 10.0,
        size: int = 512,
        resize: str = "keep",
        adain: bool = True,
        seed: int = 0,
        params: Optional[StylizeParams] = None,
        progress: Optional[ProgressCallback] = None,
        return_latents: bool = False,
    ) -> InSTOutput:
        """Stylize `content` like `style`.

        Parameters
        ----------
        content : ndarray of shape (M, N) or (M, N, 3)
            The image to restyle (e.g. a generated layout); its shape, dtype and
            value range are kept.
        style : ndarray of shape (P, Q) or (P, Q, 3)
            A real image of the target style.
        token : StyleToken
            The learned style token.
        strength, num_inference_steps, guidance_scale, size, resize, adain, seed
            See :class:`~cellsynth.stylize.StylizeParams`; ignored when `params` is given.
        params : StylizeParams, optional
            All settings at once.
        progress : ProgressCallback, optional
            Stage ``"stylize"``: encode, inversion, one event per DDIM step, decode.
            May raise ``Cancelled`` between steps.
        return_latents : bool
            Also return the final latent.

        Returns
        -------
        InSTOutput
        """
        # 1. Check inputs
        if params is None:
            params = StylizeParams(strength=strength, num_inference_steps=num_inference_steps,
                                   guidance_scale=guidance_scale, size=size, resize=resize, adain=adain, seed=seed)
        if not isinstance(token, StyleToken):
            raise TypeError(f"token must be a StyleToken, got {type(token).__name__}")
        if type(self.scheduler) is not type(inst_scheduler(params.scheduler)):
            self.scheduler = inst_scheduler(params.scheduler)  # on InST's schedule, whatever was loaded
        if self.image_encoder is None or self.feature_extractor is None:
            raise ValueError("InSTPipeline needs an image_encoder and a feature_extractor for the style image")
        width = self.text_encoder.config.hidden_size
        if token.dim != width or self.image_encoder.config.projection_dim != token.dim:
            raise ValueError(
                f"token width {token.dim} does not fit this model (text width {width}, image embedding "
                f"width {self.image_encoder.config.projection_dim})"
            )
        content_rgb, value_range = to_unit_rgb(content)
        style_rgb, _ = to_unit_rgb(style)
        token_id = placeholder_id(self.tokenizer, token.placeholder)
        device = self._execution_device
        dtype = self.unet.dtype
        do_cfg = params.guidance_scale > 1.0

        with oom_guard("stylization", device=device):
            # 2. Prepare: resize/pad to multiples of 8, VAE-encode, latent AdaIN
            self.scheduler.set_timesteps(params.num_inference_steps, device=device)
            timesteps, n_steps = self.get_timesteps(params.num_inference_steps, params.strength, device)
            total = n_steps + 3
            work, inner = to_working(content_rgb, size=params.size, resize=params.resize)
            style_work, _ = to_working(style_rgb, size=params.size, resize="keep")
            content_latent = self._encode(work, device)
            style_latent = self._encode(style_work, device)
            latent0 = content_latent
            if params.adain:
                latent0 = latent_adain(content_latent.float(), style_latent.float()).to(dtype)
            report(progress, "stylize", 1, total, "encoded")

            # 3. Conditioning: the style token injected for the placeholder
            clip_style = clip_view(style_rgb, clip_input=token.clip_input)  # the view the token was trained on
            image_embeds = clip_image_embeds(self.image_encoder, self.feature_extractor, clip_style[None],
                                             clip_input=token.clip_input)
            mapper = token.mapper.to(device=device, dtype=torch.float32).eval()
            vector = mapper(image_embeds.to(device))[0]
            with inject_token(self.text_encoder, token_id, vector):
                cond, uncond = self.encode_prompt(token.placeholder, device, 1, do_cfg, negative_prompt="")
            embeds = torch.cat([uncond, cond]) if do_cfg else cond

            # 4. Stochastic inversion: noise the latent to t = int(1000 * strength), predict eps there with
            #    the conditional prompt, and form z = sqrt(abar) x0 + sqrt(1 - abar) eps_hat. abar is taken at
            #    the first DDIM timestep (681 for 0.7 x 50), where DDIM picks z up; the official code takes it
            #    at t = 700 and so starts DDIM from a latent slightly noisier than the schedule expects.
            t_train = self.scheduler.config.num_train_timesteps
            t_inv = min(int(t_train * params.strength), t_train - 1)
            generator = torch.Generator("cpu").manual_seed(params.seed)
            latents = latent0
            if n_steps:
                noise = torch.randn(latent0.shape, generator=generator, dtype=torch.float32).to(device, dtype)
                t_inv_tensor = torch.tensor([t_inv], device=device)
                noisy = self._noised(latent0, noise, t_inv)
                eps_hat = self.unet(noisy, t_inv_tensor, encoder_hidden_states=cond).sample
                latents = self._noised(latent0, eps_hat, int(timesteps[0]))
            report(progress, "stylize", 2, total, f"inverted at t={t_inv}")

            # 5. DDIM from the matching timestep, with classifier-free guidance
            for i, t in enumerate(timesteps):
                model_in = torch.cat([latents] * 2) if do_cfg else latents
                eps = self.unet(model_in, t, encoder_hidden_states=embeds).sample
                if do_cfg:
                    eps_uncond, eps_cond = eps.chunk(2)
                    eps = eps_uncond + params.guidance_scale * (eps_cond - eps_uncond)
                step_kwargs = {"eta": 0.0} if isinstance(self.scheduler, DDIMScheduler) else {}
                latents = self.scheduler.step(eps, t, latents, **step_kwargs).prev_sample
                report(progress, "stylize", 3 + i, total, f"denoising step {i + 1}/{n_steps}")

            # 6. Decode and return in the input's value range
            decoded = self.vae.decode(latents / self.vae.config.scaling_factor).sample
            rgb = self.image_processor.postprocess(decoded.float(), output_type="np")[0]
            image = from_unit_rgb(from_working(rgb, inner, content_rgb.shape), value_range)
            report(progress, "stylize", total, total, "decoded")
            metadata = {
                "operation": "stylize.inst",
                "params": params.to_dict(),
                "t_inversion": t_inv if n_steps else None,
                "t_start": int(timesteps[0]) if n_steps else None,
                "denoising_steps": int(n_steps),
                "working_shape": list(work.shape[:2]),
                "token": {k: v for k, v in token.describe().items()
                          if k in ("placeholder", "clip_input", "encoder", "source")},
                "token_style_sha256": list(token.style_sha256),
                "style_sha256": image_sha256(np.asarray(style)),
                "content_sha256": image_sha256(np.asarray(content)),
            }
            return InSTOutput(image=image, metadata=metadata, latents=latents if return_latents else None)

    def _noised(self, x0: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        """``sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` at training timestep `t` (any scheduler of the run)."""
        abar = self.scheduler.alphas_cumprod[int(t)].to(torch.float32)
        return (abar.sqrt() * x0.float() + (1 - abar).sqrt() * eps.float()).to(x0.dtype)

    def _posterior(self, rgb: np.ndarray, device):
        """VAE posterior (diffusers' DiagonalGaussianDistribution) of a float RGB image in [0, 1]."""
        x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None] * 2.0 - 1.0
        return self.vae.encode(x.to(device=device, dtype=self.vae.dtype)).latent_dist

    def _encode(self, rgb: np.ndarray, device) -> torch.Tensor:
        """VAE posterior mean of a float RGB image in [0, 1], times the latent scale (deterministic)."""
        return self._posterior(rgb, device).mean * self.vae.config.scaling_factor
