"""Tiny, seeded InST components for tests, docs and benchmarks (random weights, offline).

The real classes (diffusers UNet2DConditionModel and AutoencoderKL, transformers
CLIPTextModel and CLIPVisionModelWithProjection) at tiny sizes, with the tiny
CLIP tokenizer shipped in ``resources/tokenizer-tiny``. The VAE downsamples by
8 as Stable Diffusion's does.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["tiny_components", "tiny_pipeline", "tiny_token", "save_tiny_pipeline", "TINY_WIDTH"]

TINY_WIDTH = 32
"""Width of the tiny text embeddings, image embeddings and style mapper."""


def tiny_components(seed: int = 0) -> dict:
    """The components of a tiny InST pipeline, built with fixed seeds.

    Returns
    -------
    dict
        ``vae``, ``text_encoder``, ``tokenizer``, ``unet``, ``scheduler``,
        ``image_encoder``, ``feature_extractor``, ``safety_checker`` (None).

    Examples
    --------
    >>> parts = tiny_components(0)
    >>> parts["unet"].config.cross_attention_dim, parts["image_encoder"].config.projection_dim
    (32, 32)
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from ..weights import resources_dir
    from .pipeline_inst import inst_scheduler

    tokenizer = CLIPTokenizer.from_pretrained(resources_dir() / "tokenizer-tiny")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TINY_WIDTH, attention_head_dim=4,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
        # scaling_factor gives these random latents about unit variance, as 0.18215 does for SD's
        block_out_channels=(8, 8, 8, 8), sample_size=64, scaling_factor=6.0,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TINY_WIDTH, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TINY_WIDTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )).eval()
    torch.manual_seed(seed + 3)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=TINY_WIDTH, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8, projection_dim=TINY_WIDTH,
    )).eval()
    feature_extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return {
        "vae": vae.eval(), "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet.eval(),
        "scheduler": inst_scheduler(), "safety_checker": None, "feature_extractor": feature_extractor,
        "image_encoder": image_encoder,
    }


def tiny_pipeline(seed: int = 0):
    """A tiny :class:`~cellsynth.stylize.InSTPipeline` on CPU.

    Examples
    --------
    >>> import numpy as np
    >>> pipe = tiny_pipeline(0)
    >>> out = pipe(np.zeros((20, 28), np.uint8), np.full((16, 16), 200, np.uint8), tiny_token(0),
    ...            num_inference_steps=4, size=32)
    >>> out.image.shape, out.image.dtype, out.metadata["denoising_steps"]
    ((20, 28), dtype('uint8'), 2)
    """
    from .pipeline_inst import InSTPipeline

    pipe = InSTPipeline(**tiny_components(seed), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_token(seed: int = 0):
    """A randomly initialised :class:`~cellsynth.stylize.StyleToken` that fits the tiny pipeline."""
    import torch

    from .mapper import StyleMapper
    from .tokens import StyleToken

    torch.manual_seed(seed)
    return StyleToken(StyleMapper(TINY_WIDTH, heads=2, dim_head=8).eval(), encoder="tiny")


def save_tiny_pipeline(folder: os.PathLike | str, seed: int = 0) -> Path:
    """Save a tiny pipeline with ``save_pretrained`` (a local model folder for the CLI and widget)."""
    folder = Path(folder)
    tiny_pipeline(seed).save_pretrained(folder, safe_serialization=True)
    return folder
