"""Style-token training on a tiny model: the loss drops, checkpoints resume exactly, caching is faithful."""

import numpy as np
import pytest
import torch

from cellsynth.progress import Cancelled
from cellsynth.stylize import TrainParams, load_token, token_loss, train_token
from cellsynth.stylize.tiny import tiny_pipeline, tiny_token


@pytest.fixture(scope="module")
def pipe():
    """The tiny pipeline with its cross-attention outputs amplified, so that the prompt (and so the token)
    has a measurable effect on the random UNet's noise prediction."""
    torch.set_num_threads(1)
    pipe = tiny_pipeline(0)
    with torch.no_grad():
        for name, module in pipe.unet.named_modules():
            if name.endswith("attn2"):
                module.to_out[0].weight.mul_(20.0)
    return pipe


@pytest.fixture(scope="module")
def style():
    return (np.random.default_rng(0).random((48, 48)) * 255).astype(np.uint8)


def test_training_lowers_the_loss_and_trains_only_the_mapper(pipe, style):
    frozen = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    before = token_loss(pipe, tiny_token(1), [style], size=32, n=96)
    result = train_token([style], pipe, token=tiny_token(1),
                         params=TrainParams(steps=120, size=32, learning_rate=3e-3, flip=False, checkpoint_every=0))
    after = token_loss(pipe, result.token, [style], size=32, n=96)  # same timesteps and noises: paired
    assert after < before - 5e-3  # about 0.02 on this model, for any evaluation seed
    assert len(result.losses) == 120 and np.isfinite(result.losses).all()
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in frozen.items())
    assert result.token.source == "trained" and result.token.clip_input == "proper"
    assert result.token.training["steps"] == 120 and len(result.token.style_sha256) == 1


def test_checkpoint_cancel_and_resume_reproduce_an_uninterrupted_run(pipe, style, tmp_path):
    params = TrainParams(steps=6, size=32, checkpoint_every=2, learning_rate=1e-3)
    full = train_token([style, style[::-1]], pipe, token=tiny_token(1), params=params)

    def cancel_at_5(p):
        if p.step == 5:
            raise Cancelled()

    with pytest.raises(Cancelled):
        train_token([style, style[::-1]], pipe, token=tiny_token(1), params=params, checkpoint_dir=tmp_path,
                    progress=cancel_at_5)
    assert load_token(tmp_path / "token").dim == 32
    steps = []
    resumed = train_token([style, style[::-1]], pipe, token=tiny_token(1), params=params, checkpoint_dir=tmp_path,
                          on_step=lambda s, loss: steps.append(s))
    assert resumed.resumed_from == 4 and steps == [5, 6]
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=1e-5)
    x = torch.randn(1, 32)
    assert torch.allclose(resumed.token.mapper(x), full.token.mapper(x), atol=1e-6)


def test_cached_latents_give_the_same_steps_as_re_encoding(pipe, style):
    kw = dict(steps=4, size=32, checkpoint_every=0)
    cached = train_token([style], pipe, token=tiny_token(1), params=TrainParams(cache=True, **kw))
    fresh = train_token([style], pipe, token=tiny_token(1), params=TrainParams(cache=False, **kw))
    np.testing.assert_allclose(cached.losses, fresh.losses, rtol=1e-5)


def test_bad_inputs_are_refused(pipe):
    with pytest.raises(ValueError, match="at least one style image"):
        train_token([], pipe)
    with pytest.raises(ValueError, match="multiple of 8"):
        TrainParams(size=30)
