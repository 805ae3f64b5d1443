"""Single-file Stable Diffusion checkpoints: offline with shipped configs, Lightning .ckpt read without code.

The tiny pipeline's weights are written in the original (LDM) key layout of
``sd-v1-4.ckpt``, by the inverse of the key mapping diffusers applies when it
reads such files, then loaded back with no network: the weights must come back
unchanged.
"""

import re
import shutil
import sys
import types

import pytest
import torch

from cellsynth.stylize import loading
from cellsynth.stylize.tiny import save_tiny_pipeline, tiny_pipeline
from cellsynth.state_dicts import read_state_dict
from cellsynth.weights import sd_v1_config_dir

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet(rest):
    for new, old in _RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def ldm_unet_key(key, layers, attn_up_blocks):
    """The original key of a diffusers UNet2DConditionModel key (SD v1 layout)."""
    head, _, param = key.rpartition(".")
    if head in _UNET_FIXED:
        return f"{_UNET_FIXED[head]}.{param}"
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        base = 1 + b * (layers + 1)
        if kind == "resnets":
            return f"input_blocks.{base + j}.0.{_resnet(rest)}"
        if kind == "attentions":
            return f"input_blocks.{base + j}.1.{rest}"
        return f"input_blocks.{base + layers}.0.op.{rest.removeprefix('conv.')}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        if m[1] == "resnets":
            return f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}"
        return f"middle_block.1.{m[3]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        base = b * (layers + 1)
        if kind == "resnets":
            return f"output_blocks.{base + j}.0.{_resnet(rest)}"
        if kind == "attentions":
            return f"output_blocks.{base + j}.1.{rest}"
        return f"output_blocks.{base + layers}.{2 if b in attn_up_blocks else 1}.{rest}"
    raise AssertionError(f"unmapped UNet key {key}")


def ldm_vae_key(key, n_blocks):
    """The original key of a diffusers AutoencoderKL key."""
    key = key.replace("conv_norm_out", "norm_out")
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        rest = m[2].replace("group_norm", "norm").replace("to_out.0", "proj_out")
        rest = re.sub(r"^to_([qkv])\.", r"\1.", rest)
        return f"{m[1]}.mid.attn_1.{rest}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0)\.(.*)", key):
        if m[3] is not None:
            return f"encoder.down.{m[1]}.block.{m[3]}.{m[4].replace('conv_shortcut', 'nin_shortcut')}"
        return f"encoder.down.{m[1]}.downsample.{m[4]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)", key):
        i = n_blocks - 1 - int(m[1])
        if m[3] is not None:
            return f"decoder.up.{i}.block.{m[3]}.{m[4].replace('conv_shortcut', 'nin_shortcut')}"
        return f"decoder.up.{i}.upsample.{m[4]}"
    return key


def ldm_state_dict(pipe):
    """The pipeline's UNet, VAE and text encoder as one state dict in the original layout."""
    unet_cfg = pipe.unet.config
    attn_up = {i for i, t in enumerate(unet_cfg.up_block_types) if "CrossAttn" in t}
    out = {}
    for k, v in pipe.unet.state_dict().items():
        out["model.diffusion_model." + ldm_unet_key(k, unet_cfg.layers_per_block, attn_up)] = v.clone()
    n = len(pipe.vae.config.down_block_types)
    for k, v in pipe.vae.state_dict().items():
        new = ldm_vae_key(k, n)
        if ".mid.attn_1." in new and new.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # 1x1 convolutions in the original
        out["first_stage_model." + new] = v.clone()
    for k, v in pipe.text_encoder.state_dict().items():
        out["cond_stage_model.transformer." + k] = v.clone()
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    folder = save_tiny_pipeline(tmp_path_factory.mktemp("cfg") / "tiny-sd")
    # an image-encoder folder as a CLIP model's: encoder and processor together
    shutil.copy(folder / "feature_extractor" / "preprocessor_config.json", folder / "image_encoder")
    return tiny_pipeline(0), folder


@pytest.fixture
def no_network(monkeypatch):
    """Offline, and any socket connection fails the test."""
    import socket

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        pytest.fail("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    loading.clear_cache()
    yield
    loading.clear_cache()


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def _fake_lightning_module():
    """A module named like Lightning's, so that pickling a callback object records its global."""
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_score = torch.tensor(0.5)
            self.monitor = "val/loss"

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = mod.__name__, "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    return mod


@pytest.mark.parametrize("fmt", ["safetensors", "lightning-ckpt"])
def test_single_file_loads_offline_with_the_given_configs(tiny, tmp_path, no_network, monkeypatch, fmt):
    pipe, cfg = tiny
    state = ldm_state_dict(pipe)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "sd-tiny.safetensors"
        save_file(state, str(path))
    else:
        mod = _fake_lightning_module()
        for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
        path = tmp_path / "sd-tiny.ckpt"
        torch.save({"state_dict": state, "global_step": 470000, "epoch": 3,
                    "callbacks": {"ModelCheckpoint": mod.ModelCheckpoint()}}, path)
        for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__):
            monkeypatch.delitem(sys.modules, name)  # the loader never imports Lightning
    loaded = loading.load_pipeline(path, image_encoder=cfg / "image_encoder", config=cfg, device="cpu",
                                   cache=False)
    _assert_same_weights(loaded.unet, pipe.unet)
    _assert_same_weights(loaded.vae, pipe.vae)
    _assert_same_weights(loaded.text_encoder, pipe.text_encoder)
    assert loaded.tokenizer("*", add_special_tokens=False).input_ids == pipe.tokenizer(
        "*", add_special_tokens=False).input_ids
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"  # InST's DDIM, configured from the file's betas


def test_malicious_ckpt_is_refused_before_unpickling(tmp_path, no_network):
    path = tmp_path / "evil.ckpt"
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {"w": torch.ones(1)}, "x": Evil()}, path)
    with pytest.raises(ValueError, match=r"refusing to load .*(os\.system|posix\.system)"):
        loading.load_pipeline(path, device="cpu", cache=False)
    assert not marker.exists()


def test_files_that_are_not_sd_v1_checkpoints_are_refused(tmp_path, tiny, no_network):
    from safetensors.torch import save_file

    _, cfg = tiny
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.ones(2)}, str(path))
    with pytest.raises(ValueError, match="not a Stable Diffusion checkpoint"):
        loading.load_pipeline(path, image_encoder=cfg / "image_encoder", config=cfg, device="cpu", cache=False)
    save_file({"model.diffusion_model.x": torch.ones(2), "cond_stage_model.model.y": torch.ones(2)}, str(path))
    with pytest.raises(ValueError, match="SD 2.x and SDXL"):
        loading.load_pipeline(path, image_encoder=cfg / "image_encoder", config=cfg, device="cpu", cache=False)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable"):
        read_state_dict(junk)
    empty = tmp_path / "empty.ckpt"
    torch.save({"epoch": 1, "hparams": {"lr": 1e-4}}, empty)
    with pytest.raises(ValueError, match="holds no weights"):
        read_state_dict(empty)


def test_shipped_configs_build_the_published_sd_v1_4_sizes():
    """The configs used for single files describe SD v1.4: parameter counts of the published model."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = sd_v1_config_dir()
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg, subfolder="vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(cfg / "text_encoder"))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]
    sched = PNDMScheduler.from_pretrained(cfg, subfolder="scheduler").config
    assert (sched.beta_start, sched.beta_end, sched.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert vae.config.scaling_factor == 0.18215 and unet.config.cross_attention_dim == 768


def test_safetensors_file_is_read_with_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(3.0)}, str(path))
    assert torch.equal(read_state_dict(path)["a"], torch.arange(3.0))
    with pytest.raises(ValueError, match="not a checkpoint file"):
        text = tmp_path / "w.txt"
        text.write_text("x")
        read_state_dict(text)
