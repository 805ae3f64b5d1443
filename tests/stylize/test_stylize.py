"""InST pipeline on tiny real components: AdaIN, timesteps, reconstruction, token injection."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from cellsynth.progress import Cancelled
from cellsynth.stylize import StylizeParams, channel_stats, latent_adain, start_timesteps
from cellsynth.stylize.tiny import tiny_pipeline, tiny_token
from cellsynth.stylize.tokens import inject_token, placeholder_id


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return tiny_pipeline(0)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    content = np.zeros((40, 56), np.uint8)
    content[10:20, 10:20] = 220
    content[25:35, 30:45] = 180
    style = (rng.normal(90, 40, (48, 48))).clip(0, 255).astype(np.uint8)
    return content, style


def _spy_timesteps(pipe, monkeypatch):
    seen = []
    forward = pipe.unet.forward

    def spy(sample, timestep, *args, **kwargs):
        seen.append(int(torch.as_tensor(timestep).reshape(-1)[0]))
        return forward(sample, timestep, *args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", spy)
    return seen


@pytest.mark.parametrize("module", ["cellsynth.stylize", "cellsynth.stylize._cli", "cellsynth._napari.stylize_widget"])
def test_imports_stay_light(module):
    code = (f"import sys, {module}, cellsynth.stylize as s; s.StylizeParams(); s.TrainParams(); "
            "heavy = {m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'transformers', 'timm'}; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_latent_adain_gives_the_style_statistics_on_vae_latents(pipe, images):
    content, style = images
    from cellsynth.stylize._image import to_unit_rgb, to_working

    with torch.no_grad():
        lat = [pipe._encode(to_working(to_unit_rgb(x)[0], size=32)[0], "cpu") for x in (content, style)]
    out = latent_adain(lat[0], lat[1])
    mean_o, std_o = channel_stats(out, eps=0)
    mean_s, std_s = channel_stats(lat[1])
    mean_c, std_c0 = channel_stats(lat[0], eps=0)
    _, std_c = channel_stats(lat[0])
    assert torch.allclose(mean_o, mean_s, atol=1e-5)
    # the style's std (unbiased variance + 1e-5), shrunk only by the content's own eps term
    assert torch.allclose(std_o, std_s * std_c0 / std_c, rtol=1e-4)
    assert torch.allclose(std_o, std_s, rtol=0.05)
    assert not torch.allclose(mean_c, mean_s, atol=1e-2)  # the test can fail: stats did change


def test_strength_07_with_50_steps_inverts_at_700_and_starts_at_681(pipe, images, monkeypatch):
    assert start_timesteps(0.7, 50) == (700, 681)
    seen = _spy_timesteps(pipe, monkeypatch)
    out = pipe(*images, tiny_token(0), strength=0.7, num_inference_steps=50, size=32)
    assert seen[0] == 700  # stochastic inversion, conditional branch only
    assert seen[1:] == list(range(681, 0, -20))  # 35 DDIM steps from 681 down to 1
    meta = out.metadata
    assert (meta["t_inversion"], meta["t_start"], meta["denoising_steps"]) == (700, 681, 35)


def test_strength_near_zero_returns_the_vae_reconstruction(pipe, images):
    content, _ = images
    token = tiny_token(0)
    exact = pipe(content, content, token, strength=0.0, size=32).image  # no step at all
    from cellsynth.stylize._image import from_unit_rgb, from_working, to_unit_rgb, to_working

    rgb, vr = to_unit_rgb(content)
    work, inner = to_working(rgb, size=32)
    with torch.no_grad():
        dec = pipe.vae.decode(pipe._encode(work, "cpu") / pipe.vae.config.scaling_factor).sample
    recon = from_unit_rgb(from_working((dec[0].permute(1, 2, 0).numpy() / 2 + 0.5).clip(0, 1), inner, rgb.shape), vr)
    assert np.abs(exact.astype(int) - recon.astype(int)).max() <= 1
    near = pipe(content, content, token, strength=0.02, num_inference_steps=50, size=32)
    assert near.metadata["denoising_steps"] == 1 and near.metadata["t_start"] == 1
    far = pipe(content, content, token, strength=0.7, num_inference_steps=10, size=32).image
    d_near = np.abs(near.image.astype(float) - recon).mean()
    d_far = np.abs(far.astype(float) - recon).mean()
    assert d_near < 3.0 and d_near < d_far / 3


def test_token_changes_input_embeddings_only_at_placeholder_positions(pipe):
    enc, tok = pipe.text_encoder, pipe.tokenizer
    pid = placeholder_id(tok, "*")
    ids = tok("a * cell", padding="max_length", max_length=77, return_tensors="pt").input_ids
    pos = (ids[0] == pid).nonzero().ravel().tolist()
    assert len(pos) == 1
    captured = []
    handle = getattr(enc, "text_model", enc).embeddings.register_forward_hook(lambda m, a, o: captured.append(o.detach()))
    try:
        with torch.no_grad():
            plain = enc(ids)[0]
            with inject_token(enc, pid, torch.full((32,), 0.5)):
                injected = enc(ids)[0]
            after = enc(ids)[0]
    finally:
        handle.remove()
    changed = (captured[0] - captured[1]).abs().amax(dim=-1)[0]
    assert changed.nonzero().ravel().tolist() == pos
    tok_emb = enc.get_input_embeddings().weight[pid].detach()
    pos_emb = getattr(enc, "text_model", enc).embeddings.position_embedding.weight[pos[0]].detach()
    assert torch.allclose(captured[1][0, pos[0]], 0.5 + pos_emb) and torch.allclose(captured[0][0, pos[0]], tok_emb + pos_emb)
    # causal text encoder: states before the placeholder are untouched, the hook is gone afterwards
    assert torch.equal(plain[0, : pos[0]], injected[0, : pos[0]])
    assert not torch.allclose(plain[0, pos[0]:], injected[0, pos[0]:])
    assert torch.equal(plain, after)


def test_outputs_keep_shape_dtype_range_and_are_seeded(pipe, images):
    content, style = images
    token = tiny_token(0)
    kw = dict(strength=0.6, num_inference_steps=5, size=32)
    a = pipe(content, style, token, seed=1, **kw).image
    b = pipe(content, style, token, seed=1, **kw).image
    c = pipe(content, style, token, seed=2, **kw).image
    assert a.shape == content.shape and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    other = pipe(content, style, tiny_token(5), seed=1, **kw).image
    assert not np.array_equal(a, other)  # the token matters
    rgb = np.random.default_rng(1).random((24, 30, 3)).astype(np.float32) * 4 + 10
    out = pipe(rgb, style, token, **kw).image
    assert out.shape == rgb.shape and out.dtype == np.float32 and 10 <= out.min() and out.max() <= 14
    u16 = (content.astype(np.uint16) * 100 + 1000)
    out16 = pipe(u16, style, token, **kw).image
    assert out16.dtype == np.uint16 and out16.min() >= 1000 and out16.max() <= 23000


def test_resize_modes_and_params_object(pipe, images):
    content, style = images
    keep = pipe(content, style, tiny_token(0), params=StylizeParams(size=64, num_inference_steps=2))
    squash = pipe(content, style, tiny_token(0), params=StylizeParams(size=64, resize="squash", num_inference_steps=2))
    assert keep.metadata["working_shape"] == [48, 64]  # 40x56 -> 46x64, padded to 48x64
    assert squash.metadata["working_shape"] == [64, 64]
    assert keep.image.shape == squash.image.shape == content.shape
    with pytest.raises(ValueError, match="strength"):
        pipe(content, style, tiny_token(0), strength=1.5)
    with pytest.raises(TypeError, match="StyleToken"):
        pipe(content, style, "token.pt")


def test_progress_every_step_and_cancel_between_steps(pipe, images):
    events = []
    pipe(*images, tiny_token(0), strength=0.5, num_inference_steps=8, size=32, progress=events.append)
    assert [e.step for e in events] == list(range(1, 8)) and {e.total for e in events} == {7}

    def cancel_at_3(p):
        if p.step == 3:
            raise Cancelled()

    with pytest.raises(Cancelled):
        pipe(*images, tiny_token(0), strength=0.5, num_inference_steps=8, size=32, progress=cancel_at_3)


def test_no_guidance_runs_the_conditional_branch_only(pipe, images, monkeypatch):
    batches = []
    forward = pipe.unet.forward

    def spy(sample, *args, **kwargs):
        batches.append(sample.shape[0])
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", spy)
    out = pipe(*images, tiny_token(0), strength=0.5, num_inference_steps=4, guidance_scale=1.0, size=32)
    assert batches == [1, 1, 1] and np.isfinite(out.image.astype(float)).all()
    batches.clear()
    pipe(*images, tiny_token(0), strength=0.5, num_inference_steps=4, guidance_scale=5.0, size=32)
    assert batches == [1, 2, 2]  # inversion: conditional only; DDIM: unconditional + conditional


def test_the_longest_allowed_run_stays_inside_the_schedule(pipe, images):
    out = pipe(*images, tiny_token(0), strength=1.0, num_inference_steps=500, guidance_scale=1.0, size=16)
    assert out.metadata["t_start"] == 999 and out.metadata["t_inversion"] == 999
    with pytest.raises(ValueError, match="num_inference_steps"):
        StylizeParams(num_inference_steps=1000)


def test_inversion_noises_adain_latent_and_uses_the_conditional_eps(pipe, images, monkeypatch):
    from cellsynth.stylize._image import to_unit_rgb, to_working

    content, style = images
    calls = []
    forward = pipe.unet.forward

    def spy(sample, timestep, *args, encoder_hidden_states=None, **kwargs):
        out = forward(sample, timestep, *args, encoder_hidden_states=encoder_hidden_states, **kwargs)
        calls.append((sample.clone(), int(torch.as_tensor(timestep).reshape(-1)[0]), encoder_hidden_states.clone(),
                      out.sample.clone()))
        return out

    monkeypatch.setattr(pipe.unet, "forward", spy)
    pipe(content, style, tiny_token(0), strength=0.7, num_inference_steps=10, guidance_scale=7.0, size=32, seed=3)
    with torch.no_grad():
        lat = [pipe._encode(to_working(to_unit_rgb(x)[0], size=32)[0], "cpu") for x in (content, style)]
    latent0 = latent_adain(*lat)
    noise = torch.randn(latent0.shape, generator=torch.Generator("cpu").manual_seed(3))
    abar = pipe.scheduler.alphas_cumprod
    (x_inv, t_inv, cond_inv, eps_hat), (x_first, t_first, cfg_embeds, _) = calls[:2]
    assert (t_inv, t_first) == (700, 601) and len(calls) == 8
    # 1. the AdaIN latent noised to t = 700 with the seeded noise
    torch.testing.assert_close(x_inv, abar[700].sqrt() * latent0 + (1 - abar[700]).sqrt() * noise)
    # 2. eps predicted with the conditional prompt only (the second half of the guidance batch)
    assert x_inv.shape[0] == 1 and cfg_embeds.shape[0] == 2
    assert torch.equal(cond_inv, cfg_embeds[1:]) and not torch.equal(cond_inv, cfg_embeds[:1])
    # 3. DDIM starts from sqrt(abar) x0 + sqrt(1 - abar) eps_hat at its first timestep
    z = abar[601].sqrt() * latent0 + (1 - abar[601]).sqrt() * eps_hat
    torch.testing.assert_close(x_first, torch.cat([z, z]))


def test_the_scheduler_is_ddim_as_inst_configures_it():
    from diffusers import DDIMScheduler

    from cellsynth.stylize import inst_scheduler

    s = inst_scheduler()
    assert isinstance(s, DDIMScheduler) and s.config.prediction_type == "epsilon"
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(s.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-5, atol=1e-7)
    assert s.config.steps_offset == 1 and s.config.set_alpha_to_one is False and not s.config.clip_sample
    assert s.final_alpha_cumprod == s.alphas_cumprod[0]  # set_alpha_to_one False
