"""DiffStain presets: 'fast' by default, 'paper' as published; DINO mask guidance reachable from the CLI."""

import numpy as np
import pytest

from cellsynth import io
from cellsynth.cli import main
from cellsynth.stain import NSCParams, StainParams, stain_preset

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_presets():
    fast, fast_nsc = stain_preset()
    assert fast == StainParams(steps=10) and fast_nsc == NSCParams()  # 10 steps: a 512x512 plane in ~40 s on a CPU
    assert fast.scheduler == "ddim" and not fast.guidance and fast_nsc.backbone == "filters"
    paper, nsc = stain_preset("paper")
    # DiffStain: full DDPM schedule, mask guidance with masks fed back, 512 x 512 fields
    assert (paper.scheduler, paper.guidance, paper.refine, paper.tile) == ("ddpm", True, 2, 512)
    # the public NSC code: DINO ViT-S/8, a 256-pixel quarter upscaled to 512 -> 64 x 64 patches; paper k = r = 5
    assert (nsc.backbone, nsc.fov, nsc.input_size, nsc.grid, nsc.k, nsc.r) == ("dino-vits8", 256, 512, 64, 5, 5)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from cellsynth.stain.model import StainModelConfig, build_unet, save_stain_model

    torch.manual_seed(0)
    cfg = StainModelConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=8, sample_size=16,
                           num_train_timesteps=8, attention_head_dim=4, dropout=0.0, mask_levels=[[-1.0, 2.0]] * 5)
    return save_stain_model(build_unet(cfg).eval(), cfg, tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture
def brightfield(tmp_path):
    path = tmp_path / "bf.tif"
    io.write_tiff(path, np.random.default_rng(0).random((3, 32, 32)).astype(np.float32))
    return path


def test_cli_applies_the_preset_then_the_options_given():
    import argparse

    from cellsynth.stain._cli import _sampling_args, _params

    parser = argparse.ArgumentParser()
    _sampling_args(parser)
    params, nsc = _params(parser.parse_args(["--preset", "paper"]))
    assert (params, nsc) == stain_preset("paper")
    params, nsc = _params(parser.parse_args(["--preset", "paper", "--tile", "0", "--nsc-backbone", "dinov2-small",
                                             "--guidance", "off", "--seed", "3"]))
    assert (params.tile, params.guidance, params.seed, params.scheduler) == (0, False, 3, "ddpm")
    assert nsc.backbone == "dinov2-small" and nsc.fov == 256
    params, nsc = _params(parser.parse_args([]))
    assert (params, nsc) == stain_preset("fast")


def test_cli_guided_ddpm_run_equals_the_library_call(model, brightfield, tmp_path, capsys):
    import dataclasses

    from cellsynth.stain import load_stain_model

    out = tmp_path / "v.tif"
    assert main(["stain", str(brightfield), "--out", str(out), "--model", str(model), "--scheduler", "ddpm",
                 "--guidance", "on", "--refine", "2", "--nsc-backbone", "filters", "--device", "cpu"]) == 0
    assert "preset fast, ddpm, mask guidance with filters NSC masks" in capsys.readouterr().out
    v, _ = io.read_tiff(out)
    assert v.shape == (5, 32, 32) and np.isfinite(v).all()
    params, nsc = stain_preset("fast")
    ref = load_stain_model(str(model), device="cpu")(
        io.read_tiff(brightfield)[0], params=dataclasses.replace(params, scheduler="ddpm", guidance=True, refine=2),
        nsc_params=nsc)
    np.testing.assert_allclose(v, ref.images, atol=1e-5)
    assert len(ref.masks) == 2  # two guided rounds, masks fed back from the generated channels


def test_cli_dino_guidance_without_weights_is_a_clear_error(model, brightfield, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    out = tmp_path / "v.tif"
    assert main(["stain", str(brightfield), "--out", str(out), "--model", str(model), "--guidance", "on",
                 "--nsc-backbone", "dino-vits8", "--steps", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "'dino-vits8'" in err and "offline" in err
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(["stain", str(brightfield), "--out", str(out), "--preset", "slow"])


def test_widget_preset_sets_sampler_values_and_guidance_masks(make_napari_viewer):
    from cellsynth._napari.stain_widget import StainWidget

    widget = StainWidget(make_napari_viewer())
    widget.preset.value = "paper"
    params = widget.form.params(scheduler=widget.scheduler.value)
    assert (params.scheduler, params.guidance, params.refine, params.tile) == ("ddpm", True, 2, 512)
    assert widget.nsc_params() == stain_preset("paper")[1]
    widget.nsc_backbone.value = "dinov2-small"  # DINO guidance of any backbone, from the widget
    assert widget.nsc_params().backbone == "dinov2-small" and widget.nsc_params().fov == 256
    widget.preset.value = "fast"
    assert widget.form.params(scheduler=widget.scheduler.value) == stain_preset("fast")[0]
    assert widget.nsc_params() == NSCParams()


def test_train_stain_paper_preset_uses_diffstains_crops_batch_and_rate(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from cellsynth.stain import train as train_module

    seen = []

    def fake_train(data, out, *, config, resume, progress):
        seen.append(config)
        return SimpleNamespace(steps=1, losses=[0.1], seconds=1.0, out=out)

    monkeypatch.setattr(train_module, "train_stain", fake_train)
    assert main(["train-stain", str(tmp_path), "--out", str(tmp_path / "m"), "--preset", "paper"]) == 0
    assert main(["train-stain", str(tmp_path), "--out", str(tmp_path / "m"), "--preset", "paper", "--crop", "256"]) == 0
    assert main(["train-stain", str(tmp_path), "--out", str(tmp_path / "m")]) == 0
    assert [(c.crop, c.batch_size, c.lr) for c in seen] == [(512, 1, 5e-4), (256, 1, 5e-4), (64, 8, 8e-5)]
