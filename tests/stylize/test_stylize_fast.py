"""Fast InST: few-step multistep schedulers, SDPA attention, channels-last memory, optional torch.compile."""

import numpy as np
import pytest
import torch

from cellsynth.stylize import StylizeParams
from cellsynth.stylize.loading import optimize_pipeline
from cellsynth.stylize.pipeline_inst import inst_scheduler
from cellsynth.stylize.tiny import tiny_pipeline, tiny_token


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return tiny_pipeline(0)


def _images():
    rng = np.random.default_rng(0)
    return (rng.random((32, 40)) * 255).astype(np.uint8), (rng.random((32, 32)) * 255).astype(np.uint8)


@pytest.mark.parametrize("name", ["dpmsolver++", "unipc"])
def test_multistep_schedulers_run_the_same_schedule_in_fewer_steps(pipe, name):
    content, style = _images()
    unet_calls = []
    handle = pipe.unet.register_forward_hook(lambda *a: unet_calls.append(1))
    try:
        params = StylizeParams(num_inference_steps=20, size=32, scheduler=name, strength=0.7)
        out = pipe(content, style, tiny_token(0), params=params, return_latents=True)
        again = pipe(content, style, tiny_token(0), params=params, return_latents=True)
    finally:
        handle.remove()
    assert type(pipe.scheduler) is type(inst_scheduler(name))
    assert out.image.shape == content.shape and torch.isfinite(out.latents).all()
    assert torch.equal(out.latents, again.latents)  # deterministic for a seed
    ddim = pipe(content, style, tiny_token(0), params=StylizeParams(num_inference_steps=20, size=32, strength=0.7))
    # same betas and strength: the same inversion timestep, a start within one step of DDIM's, 14 steps run
    assert out.metadata["t_inversion"] == ddim.metadata["t_inversion"] == 700
    assert abs(out.metadata["t_start"] - ddim.metadata["t_start"]) < 1000 / 20
    assert out.metadata["denoising_steps"] == ddim.metadata["denoising_steps"] == 14
    assert out.metadata["params"]["scheduler"] == name
    assert len(unet_calls) == 2 * (1 + 14)  # inversion + one guided (batched) call per step, for both runs
    assert np.abs(out.image.astype(float) - ddim.image.astype(float)).mean() > 0  # another solver, another image


def test_scheduler_names_are_checked():
    with pytest.raises(ValueError, match="scheduler must be one of"):
        StylizeParams(scheduler="euler")


def test_sdpa_and_channels_last_keep_the_result(pipe):
    content, style = _images()
    params = StylizeParams(num_inference_steps=4, size=32)
    plain = pipe(content, style, tiny_token(0), params=params, return_latents=True).latents
    fast = tiny_pipeline(0)
    applied = optimize_pipeline(fast, channels_last=True)
    assert applied == {"attention": "sdpa", "channels_last": True, "compiled": False}
    conv = fast.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert all(isinstance(p, AttnProcessor2_0) for p in fast.unet.attn_processors.values())
    out = fast(content, style, tiny_token(0), params=params, return_latents=True).latents
    torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-4)


def test_compile_wraps_the_unet_once():
    p = tiny_pipeline(0)
    assert optimize_pipeline(p, channels_last=False, compile=True)["compiled"] is True
    wrapped = p.unet
    assert hasattr(wrapped, "_orig_mod") and wrapped.config.cross_attention_dim == 32  # config still reachable
    optimize_pipeline(p, compile=True)
    assert p.unet is wrapped  # not compiled twice
