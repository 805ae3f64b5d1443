"""Style-token files: our format, official embeddings.pt import, malicious files refused."""

import os
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from cellsynth.stylize import StyleMapper, import_official_token, load_token, save_token
from cellsynth.stylize.tiny import tiny_pipeline, tiny_token
from cellsynth.stylize.tokens import StyleToken, clip_image_embeds

OFFICIAL_KEYS = [
    "attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight", "attn1.to_out.0.weight", "attn1.to_out.0.bias",
    "attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight", "attn2.to_out.0.weight", "attn2.to_out.0.bias",
    "net.1.weight", "net.1.bias",
]


def _official_file(path, monkeypatch, dim=32, inner=16, extra=None, prepare=None):
    """Write a file as the official code does, with stand-ins under the ldm.modules names."""
    attention_mod = types.ModuleType("ldm.modules.attention")
    manager_mod = types.ModuleType("ldm.modules.embedding_manager")

    class CrossAttention(nn.Module):
        def __init__(self, query_dim, heads, dim_head, dropout):
            super().__init__()
            self.scale, self.heads = dim_head ** -0.5, heads
            self.to_q = nn.Linear(query_dim, heads * dim_head, bias=False)
            self.to_k = nn.Linear(query_dim, heads * dim_head, bias=False)
            self.to_v = nn.Linear(query_dim, heads * dim_head, bias=False)
            self.to_out = nn.Sequential(nn.Linear(heads * dim_head, query_dim), nn.Dropout(dropout))

    class Attentions(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn1 = CrossAttention(dim, 8, inner // 8, 0.05)
            self.attn2 = CrossAttention(dim, 8, inner // 8, 0.05)
            self.net = nn.Sequential(nn.Dropout(0.05), nn.Linear(dim, dim))

    CrossAttention.__module__, CrossAttention.__qualname__ = "ldm.modules.attention", "CrossAttention"
    Attentions.__module__, Attentions.__qualname__ = "ldm.modules.embedding_manager", "Attentions"
    attention_mod.CrossAttention, manager_mod.Attentions = CrossAttention, Attentions
    for name, mod in (("ldm", types.ModuleType("ldm")), ("ldm.modules", types.ModuleType("ldm.modules")),
                      ("ldm.modules.attention", attention_mod), ("ldm.modules.embedding_manager", manager_mod)):
        monkeypatch.setitem(sys.modules, name, mod)
    torch.manual_seed(3)
    module = Attentions()
    if prepare is not None:
        prepare(module)
    doc = {"string_to_token": {"*": torch.tensor(265)}, "attention": module}
    if extra:
        doc.update(extra)
    torch.save(doc, path)
    for name in ("ldm.modules.embedding_manager", "ldm.modules.attention", "ldm.modules", "ldm"):
        monkeypatch.delitem(sys.modules, name)  # importing must not need the ldm package
    return {k: v for k, v in module.named_parameters()}


def test_mapper_uses_the_official_parameter_names():
    assert sorted(StyleMapper(768).state_dict()) == sorted(OFFICIAL_KEYS)
    shapes = {k: tuple(v.shape) for k, v in StyleMapper(768).state_dict().items()}
    assert shapes["attn1.to_q.weight"] == (512, 768) and shapes["attn2.to_out.0.weight"] == (768, 512)
    assert shapes["net.1.weight"] == (768, 768)


def test_our_format_round_trip(tmp_path):
    token = tiny_token(2)
    token.style_sha256 = ["ab" * 32]
    folder = save_token(token, tmp_path / "tok")
    back = load_token(folder)
    x = torch.randn(2, 32)
    assert torch.equal(token.mapper(x), back.mapper(x))
    assert back.describe() == token.describe()
    with pytest.raises(FileExistsError):
        save_token(token, folder)
    save_token(token, folder, overwrite=True)
    with pytest.raises(FileNotFoundError):
        load_token(tmp_path / "nothing")


def test_official_file_imports_without_ldm_and_keeps_the_weights(tmp_path, monkeypatch):
    path = tmp_path / "embeddings.pt"
    state = _official_file(path, monkeypatch)
    assert "ldm" not in sys.modules
    token = import_official_token(path)
    assert token.placeholder == "*" and token.clip_input == "official-quirk"
    assert token.source.startswith("official:") and token.training["official_token_id"] == 265
    ours = token.mapper.state_dict()
    assert sorted(ours) == sorted(OFFICIAL_KEYS)
    assert all(torch.equal(ours[k], state[k]) for k in OFFICIAL_KEYS)
    # to our format and back: same mapping, quirk mode kept
    back = load_token(save_token(token, tmp_path / "tok"))
    x = torch.randn(1, 32)
    assert back.clip_input == "official-quirk" and torch.allclose(back.mapper.eval()(x), token.mapper.eval()(x))
    # the imported token drives the pipeline; CLIP sees the style as the official code shows it (512x512, cast)
    import cellsynth.stylize.pipeline_inst as pipeline_inst

    seen = []
    embed = pipeline_inst.clip_image_embeds
    monkeypatch.setattr(pipeline_inst, "clip_image_embeds",
                        lambda enc, proc, images, clip_input: seen.append((images.shape, clip_input))
                        or embed(enc, proc, images, clip_input=clip_input))
    out = tiny_pipeline(0)(np.zeros((16, 16), np.uint8), np.full((16, 24), 90, np.uint8), back,
                           num_inference_steps=2, size=16)
    assert out.metadata["token"]["clip_input"] == "official-quirk"
    assert seen == [((1, 512, 512, 3), "official-quirk")]


def test_malicious_file_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "embeddings.pt"
    _official_file(path, monkeypatch, extra={"hook": Payload()})
    with pytest.raises(ValueError, match="refusing to load .*system"):
        import_official_token(path)
    assert not marker.exists()


def test_unknown_classes_and_non_checkpoints_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "other.pt"
    _official_file(path, monkeypatch, extra={"extra": nn.Conv2d(1, 1, 1)})
    with pytest.raises(ValueError, match="Conv2d"):
        import_official_token(path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable"):
        import_official_token(junk)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match="string_to_token"):
        import_official_token(plain)


def test_quirk_mode_changes_what_clip_sees():
    parts = tiny_pipeline(0)
    img = np.random.default_rng(0).random((1, 40, 40, 3))
    proper = clip_image_embeds(parts.image_encoder, parts.feature_extractor, img, clip_input="proper")
    quirk = clip_image_embeds(parts.image_encoder, parts.feature_extractor, img, clip_input="official-quirk")
    assert torch.allclose(proper.norm(dim=-1), torch.ones(1)) and not torch.allclose(proper, quirk, atol=1e-3)
    with pytest.raises(ValueError, match="clip_input"):
        StyleToken(tiny_token(0).mapper, clip_input="raw")


def test_official_import_runs_no_code_of_the_pickled_modules(tmp_path, monkeypatch):
    path = tmp_path / "embeddings.pt"

    def mark_hook(module):  # a hook recorded in the file, naming an allowed class as the callable
        module._state_dict_hooks[0] = nn.Linear
        module.attn1._forward_pre_hooks[0] = nn.Sequential

    state = _official_file(path, monkeypatch, prepare=mark_hook)

    def forbidden(*args, **kwargs):
        raise AssertionError("code of a pickled module ran")

    with monkeypatch.context() as m:
        m.setattr(nn.Module, "__setstate__", forbidden)
        m.setattr(nn.Module, "state_dict", forbidden)
        token = import_official_token(path)
    ours = token.mapper.state_dict()
    assert all(torch.equal(ours[k], state[k]) for k in OFFICIAL_KEYS)


def test_a_cyclic_module_tree_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "embeddings.pt"
    _official_file(path, monkeypatch, prepare=lambda module: module.attn1._modules.__setitem__("loop", module))
    with pytest.raises(ValueError, match="too deep"):
        import_official_token(path)
