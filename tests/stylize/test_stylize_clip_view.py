"""CLIP is shown the same view of the style image when a token is trained and when it is used."""

import numpy as np
import pytest
import torch

from cellsynth.stylize import TrainParams, pipeline_inst
from cellsynth.stylize.tiny import tiny_pipeline, tiny_token
from cellsynth.stylize.train import _Data


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return tiny_pipeline(0)


@pytest.mark.parametrize("clip_input", ["proper", "official-quirk"])
def test_training_and_stylization_embed_the_same_view(pipe, monkeypatch, clip_input):
    rng = np.random.default_rng(3)
    # a wide style image whose left and right thirds differ from its centre: a squash and a centre crop
    # (the two views the training and inference paths once used) give different embeddings
    style = (rng.random((40, 120)) * 80).astype(np.uint8)
    style[:, :40] += 150
    trained = _Data(pipe, [style], TrainParams(size=32, flip=True, clip_input=clip_input), "cpu").cached
    seen = []
    real = pipeline_inst.clip_image_embeds

    def record(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(pipeline_inst, "clip_image_embeds", record)
    token = tiny_token(0)
    token.clip_input = clip_input
    pipe(np.zeros((24, 24), np.uint8), style, token, num_inference_steps=2, strength=0.5, size=32)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], trained[0][2], rtol=0, atol=1e-6)
    if clip_input == "proper":  # (the quirk's uint8 cast leaves an almost uniform image: flips look alike)
        assert not torch.allclose(trained[1][2], trained[0][2], atol=1e-4)  # the flip is its own view


def test_views_differ_from_the_old_training_view(pipe):
    """The check above can fail: the squashed view gives another embedding than the native one."""
    from cellsynth.stylize._image import to_unit_rgb, to_working
    from cellsynth.stylize.tokens import clip_image_embeds, clip_view

    style = (np.random.default_rng(3).random((40, 120)) * 80).astype(np.uint8)
    style[:, :40] += 150
    rgb, _ = to_unit_rgb(style)
    native = clip_image_embeds(pipe.image_encoder, pipe.feature_extractor, clip_view(rgb)[None])
    squashed = clip_image_embeds(pipe.image_encoder, pipe.feature_extractor,
                                 to_working(rgb, size=32, resize="squash")[0][None])
    assert (native - squashed).abs().max() > 1e-3
