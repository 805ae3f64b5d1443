"""The dtype policy of token training: trainable weights in float32, frozen ones in half, loss scaling with fp16.

Run on the CPU with bfloat16 and float16 frozen models (the kernels CUDA would run differ, the policy does not).
"""

import numpy as np
import pytest
import torch

from cellsynth.device import training_precision
from cellsynth.stylize import TrainParams, train_token
from cellsynth.stylize.tiny import tiny_pipeline, tiny_token


def test_policy_table(monkeypatch):
    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    assert training_precision("cuda", f16).describe() == {"trainable": "float32", "autocast": "float16",
                                                          "grad_scaler": True}
    assert training_precision("cuda:1", bf16).grad_scaler is False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert training_precision("cuda", f32).autocast_dtype == bf16
    assert training_precision("cuda", f32, mixed_precision=False).autocast_dtype is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100
    policy = training_precision("cuda", f32)
    assert policy.autocast_dtype == f16 and policy.grad_scaler
    assert training_precision("cpu", f32).autocast_dtype is None
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        training_precision("cpu", torch.float64)


@pytest.fixture(scope="module")
def style():
    return (np.random.default_rng(0).random((40, 40)) * 255).astype(np.uint8)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_frozen_models_train_a_float32_mapper(half, style, monkeypatch):
    torch.set_num_threads(1)
    pipe = tiny_pipeline(0).to(dtype=half)
    frozen = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    scaled = []
    real_scaler = torch.amp.GradScaler

    class CountingScaler(real_scaler):
        def scale(self, outputs):
            scaled.append(float(outputs.detach()))
            return super().scale(outputs)

    monkeypatch.setattr(torch.amp, "GradScaler", CountingScaler)
    token = tiny_token(1)
    start = {k: v.clone() for k, v in token.mapper.state_dict().items()}
    grads = []
    result = train_token([style], pipe, token=token, on_step=lambda s, loss: grads.append(
        [p.grad for p in token.mapper.parameters() if p.grad is not None]),
        params=TrainParams(steps=3, size=32, learning_rate=1e-3, flip=False, checkpoint_every=0))
    assert result.precision == {"trainable": "float32", "autocast": str(half).removeprefix("torch."),
                                "grad_scaler": half == torch.float16}
    assert len(scaled) == (3 if half == torch.float16 else 0)
    assert np.isfinite(result.losses).all()
    mapper = result.token.mapper
    assert all(p.dtype == torch.float32 for p in mapper.parameters())
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for step in grads for g in step)
    assert any(not torch.equal(v, start[k]) for k, v in mapper.state_dict().items())  # it trained
    assert pipe.unet.dtype == half and all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in frozen.items())
    assert result.token.training["precision"] == result.precision


def test_dtype_keyword_follows_the_installed_release(monkeypatch):
    from cellsynth import device

    releases = {"diffusers": (0, 39), "transformers": (4, 55)}
    monkeypatch.setattr(device, "_release", lambda lib: releases[lib])
    assert device.dtype_kwargs("diffusers", torch.float16) == {"torch_dtype": torch.float16}
    assert device.dtype_kwargs("transformers", torch.float16) == {"torch_dtype": torch.float16}
    releases.update(diffusers=(0, 40), transformers=(5, 0))
    assert device.dtype_kwargs("diffusers", torch.bfloat16) == {"dtype": torch.bfloat16}
    assert device.dtype_kwargs("transformers", torch.bfloat16) == {"dtype": torch.bfloat16}
    with pytest.raises(ValueError, match="library must be one of"):
        device.dtype_kwargs("timm", torch.float16)


def test_dependency_floors_cover_the_apis_used():
    """pyproject floors are at least the releases whose APIs the code calls (checked with those releases)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    floors = {m[0].lower(): tuple(int(x) for x in m[1].split(".")[:2])
              for m in re.findall(r'"([A-Za-z_]+)(?:\[[^\]]*\])?>=([0-9.]+)"', text)}
    assert floors["torch"] >= (2, 6)  # safe_globals with (class, name) stand-ins
    assert floors["diffusers"] >= (0, 35) and floors["transformers"] >= (4, 56)
    assert "accelerate" in floors  # diffusers loads large models without a second copy only with it
    import accelerate  # noqa: F401  (installed, as the dependency says)


def _gpu_check():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_says_clearly_when_no_gpu_is_present(monkeypatch, capsys):
    import json

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _gpu_check().main([]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["gpu"] is False and "no CUDA GPU" in doc["error"]


def test_gpu_check_builds_the_published_full_size_graphs_on_meta():
    counts = _gpu_check().param_counts()
    assert counts["sd_v1_4_unet"] == 859_520_964 and counts["sd_v1_4_vae"] == 83_653_863
    assert counts["sd_v1_4_text_encoder"] == 123_060_480
    assert abs(counts["sd_v1_4_image_encoder"] / 1e6 - 304.0) < 1.0  # CLIP ViT-L/14 vision tower + projection
    assert abs(counts["dinov2_small"] / 1e6 - 22.1) < 0.2 and abs(counts["dino_vits8"] / 1e6 - 21.7) < 0.2
