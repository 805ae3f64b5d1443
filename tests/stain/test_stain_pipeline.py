"""Staining model and pipeline: tiny real UNet2DModel on CPU, 2-5 steps."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cellsynth.progress import Cancelled  # noqa: E402
from cellsynth.stain import NSCParams, StainParams  # noqa: E402
from cellsynth.stain.model import StainModelConfig, build_unet, default_model_dir, save_stain_model  # noqa: E402
from cellsynth.stain.pipeline_stain import StainPipeline, load_stain_model  # noqa: E402

SMALL_NSC = NSCParams(k=2, r=1, fov=32, input_size=32, patch=4)


def tiny_config(**kw):
    base = dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=8, sample_size=16,
                num_train_timesteps=20, attention_head_dim=4, dropout=0.0,
                mask_levels=[[-1.0, 2.0]] * 5)
    return StainModelConfig(**{**base, **kw})


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    cfg = tiny_config()
    return StainPipeline(build_unet(cfg).eval(), cfg)


def bf(shape=(24, 28), seed=0):
    return np.random.default_rng(seed).random((3,) + shape).astype(np.float32)


def test_ddim_eta0_deterministic_for_a_seed(pipe):
    p = StainParams(steps=3, guidance=False, seed=7)
    a, b = pipe(bf(), params=p), pipe(bf(), params=p)
    assert np.array_equal(a.images, b.images)
    c = pipe(bf(), params=StainParams(steps=3, guidance=False, seed=8))
    assert not np.allclose(a.images, c.images)
    # DDPM is stochastic per step, but seeded too
    d1 = pipe(bf(), params=StainParams(scheduler="ddpm", guidance=False, seed=1))
    d2 = pipe(bf(), params=StainParams(scheduler="ddpm", guidance=False, seed=1))
    assert np.array_equal(d1.images, d2.images)


def test_step_counts_and_progress(pipe):
    events = []
    out = pipe(bf(), params=StainParams(steps=4, guidance=False), progress=events.append)
    assert [(e.stage, e.step, e.total) for e in events] == [("denoise", i, 4) for i in range(1, 5)]
    assert out.model_evaluations == 4
    events.clear()
    out = pipe(bf(), params=StainParams(scheduler="ddpm", guidance=False), progress=events.append)
    assert out.model_evaluations == 20 and len(events) == 20  # the full training schedule
    sched = pipe.make_scheduler(StainParams(steps=5))
    assert len(sched.timesteps) == 5 and int(sched.timesteps[0]) == 19


def test_default_schedule_is_the_papers():
    from diffusers import DDIMScheduler, DDPMScheduler

    paper = StainPipeline(None, StainModelConfig())  # default configuration: no network needed for schedules
    ddpm = paper.make_scheduler(StainParams(scheduler="ddpm"))
    assert isinstance(ddpm, DDPMScheduler) and len(ddpm.timesteps) == 2000 and int(ddpm.timesteps[0]) == 1999
    np.testing.assert_allclose(ddpm.betas.numpy(), np.linspace(1e-6, 0.01, 2000), rtol=1e-5, atol=1e-9)
    assert not ddpm.config.clip_sample  # targets are z-scored: no clamping of x0 to [-1, 1]
    ddim = paper.make_scheduler(StainParams())
    assert isinstance(ddim, DDIMScheduler) and len(ddim.timesteps) == 50
    assert int(ddim.timesteps[0]) == 1999 and not ddim.config.clip_sample
    np.testing.assert_allclose(ddim.alphas_cumprod.numpy(), ddpm.alphas_cumprod.numpy())


def test_shapes_range_names_and_any_size(pipe):
    for shape in ((24, 28), (9, 50), (45, 37)):
        out = pipe(bf(shape), params=StainParams(steps=2, guidance=False, overlap=4))
        assert out.images.shape == (5,) + shape and out.images.dtype == np.float32
        assert np.all(np.isfinite(out.images)) and out.images.min() >= 0 and out.images.max() <= 1
    assert out.channel_names == ["DNA", "ER", "RNA", "AGP", "Mito"] and out.colormaps[0] == "blue"


def test_tiles_blend_to_one_image(pipe):
    # one big tile vs overlapping 16-pixel tiles: same noise, blended model outputs
    x = bf((32, 32))
    whole = pipe(x, params=StainParams(steps=2, guidance=False, tile=32))
    tiled = pipe(x, params=StainParams(steps=2, guidance=False, tile=16, overlap=8))
    assert tiled.images.shape == whole.images.shape
    assert np.corrcoef(tiled.images.ravel(), whole.images.ravel())[0, 1] > 0.5
    # no seams: neighbouring columns across a tile border differ no more than elsewhere
    d = np.abs(np.diff(tiled.images, axis=2)).mean(axis=(0, 1))
    assert d[15] < 3 * np.median(d)


def test_cancel_propagates(pipe):
    def cancel(p):
        if p.step == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        pipe(bf(), params=StainParams(steps=5, guidance=False), progress=cancel)


def test_mask_guidance_changes_the_start(pipe):
    x = bf((32, 32))
    masks = np.zeros((5, 32, 32), np.uint8)
    masks[:, 8:24, 8:24] = 1
    events = []
    p = StainParams(steps=10, guidance=True, guidance_strength=0.3, refine=1)
    guided = pipe(x, params=p, masks=masks, progress=events.append)
    assert len(guided.masks) == 1 and np.array_equal(guided.masks[0], masks)
    # starts at 30 % of the schedule: 3 of 10 steps run
    assert [e.step for e in events if e.stage == "denoise"] == [1, 2, 3] and guided.model_evaluations == 3
    plain = pipe(x, params=StainParams(steps=10, guidance=False))
    assert not np.allclose(guided.images, plain.images)
    # the start follows the mask: inside/outside contrast survives the few steps
    other = pipe(x, params=p, masks=1 - masks)
    inside = masks[0] > 0
    diff = guided.images[:, inside].mean() - guided.images[:, ~inside].mean()
    diff_other = other.images[:, inside].mean() - other.images[:, ~inside].mean()
    assert diff > diff_other
    # masks are scaled into target space, not 0/255
    z = pipe._mask_to_target(masks).numpy()
    assert set(np.unique(z)) == {-1.0, 2.0}


def test_guidance_without_masks_runs_nsc_and_refines(pipe):
    events = []
    out = pipe(bf((32, 32)), params=StainParams(steps=4, guidance=True, guidance_strength=0.5, refine=2),
               nsc_params=SMALL_NSC, progress=events.append)
    assert len(out.masks) == 2 and out.masks[0].shape == (5, 32, 32) and out.masks[0].dtype == np.uint8
    assert out.model_evaluations == 4 + 2 + 2
    assert {e.stage for e in events} == {"denoise", "nsc"}


def test_bad_inputs(pipe):
    with pytest.raises(ValueError, match=r"\(3, M, N\)"):
        pipe(np.zeros((2, 16, 16)))
    with pytest.raises(ValueError, match="NaN"):
        pipe(np.full((3, 16, 16), np.nan))
    with pytest.raises(ValueError, match="masks must have shape"):
        pipe(bf(), masks=np.zeros((5, 3, 3)))
    with pytest.raises(TypeError, match="StainParams"):
        pipe(bf(), params={"steps": 2})
    with pytest.raises(ValueError, match="overlap"):
        StainParams(tile=16, overlap=16)
    with pytest.raises(ValueError, match="multiples of norm_num_groups"):
        tiny_config(block_out_channels=[12, 16])


def test_save_load_roundtrip(tmp_path, pipe):
    save_stain_model(pipe.unet, pipe.config, tmp_path / "m", extra={"note": "x"})
    loaded = load_stain_model(tmp_path / "m", device="cpu")
    p = StainParams(steps=2, guidance=False)
    np.testing.assert_allclose(loaded(bf(), params=p).images, pipe(bf(), params=p).images, atol=1e-6)
    assert loaded.training == {"note": "x"} and len(loaded.source["sha256"]) == 64
    save_stain_model(pipe.unet, pipe.config, tmp_path / "h", dtype="float16")
    half = load_stain_model(tmp_path / "h", device="cpu")
    assert half.dtype == torch.float32
    np.testing.assert_allclose(half(bf(), params=p).images, pipe(bf(), params=p).images, atol=2e-2)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"")
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a staining model"):
        load_stain_model(tmp_path / "bad")
    with pytest.raises(FileNotFoundError):
        load_stain_model(tmp_path / "nowhere")


@pytest.mark.skipif(not (default_model_dir() / "model.safetensors").exists(), reason="demo model not built")
def test_default_demo_model_loads_and_stains():
    pipe = load_stain_model("default", device="cpu")
    assert pipe.config.channel_names == ["DNA", "ER", "RNA", "AGP", "Mito"]
    out = pipe(np.full((3, 20, 20), 20000.0), params=StainParams(steps=2, guidance=False))
    assert out.images.shape == (5, 20, 20)


@pytest.mark.skipif(not (default_model_dir() / "model.safetensors").exists(), reason="demo model not built")
def test_demo_model_beats_a_linear_baseline_on_held_out_pairs():
    from scipy import ndimage as ndi

    from cellsynth.stain.metrics import stain_metrics
    from cellsynth.stain.model import to_unit
    from cellsynth.stain.simulate import simulate_stain_pair

    def filters(bfp):
        cols = [np.ones(bfp[0].size)]
        for plane in bfp.astype(float) / 20000:
            for s in (1, 2, 4):
                cols += [ndi.gaussian_filter(plane, s).ravel(), ndi.gaussian_laplace(plane, s).ravel()]
        return np.stack(cols, 1)

    pipe = load_stain_model("default", device="cpu")
    cfg = pipe.config
    fit = [simulate_stain_pair((64, 64), rng=[7, i]) for i in range(4)]  # baseline training pairs
    x = np.concatenate([filters(p.brightfield) for p in fit])
    y = np.concatenate([to_unit(p.fluorescence, cfg.target_norm).reshape(5, -1).T for p in fit])
    w = np.linalg.lstsq(x, y, rcond=None)[0]
    model_pcc, base_pcc = [], []
    for i in range(2):  # seeds never used to train the demo model
        pair = simulate_stain_pair((64, 64), rng=[2_000_003, i])
        target = to_unit(pair.fluorescence, cfg.target_norm)
        out = pipe(pair.brightfield, params=StainParams(steps=10, guidance=False))
        base = np.clip((filters(pair.brightfield) @ w).T.reshape(5, 64, 64), 0, 1)
        model_pcc.append(stain_metrics(out.images, target)["average"]["pcc"])
        base_pcc.append(stain_metrics(base, target)["average"]["pcc"])
    assert np.mean(model_pcc) >= 0.85
    assert np.mean(model_pcc) > np.mean(base_pcc) + 0.1


def test_a_field_too_large_for_memory_is_refused_before_denoising(pipe, monkeypatch):
    import psutil

    calls = []
    monkeypatch.setattr(pipe, "make_scheduler", lambda *a, **k: calls.append(1))
    small = psutil.virtual_memory()._replace(available=100_000)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: small)
    with pytest.raises(ValueError, match="staining a 24 x 28 field .* needs about"):
        pipe(bf())
    assert not calls


def test_from_pretrained_is_load_stain_model():
    a = StainPipeline.from_pretrained("default", device="cpu")
    b = load_stain_model("default", device="cpu")
    assert a.config == b.config and a.source == b.source
