"""Training a tiny staining model: loss goes down, checkpoints, resume, cancel, metrics."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cellsynth import io  # noqa: E402
from cellsynth.progress import Cancelled  # noqa: E402
from cellsynth.stain import StainParams  # noqa: E402
from cellsynth.stain.data import read_stain_dataset  # noqa: E402
from cellsynth.stain.metrics import evaluate_stain, stain_metrics  # noqa: E402
from cellsynth.stain import load_stain_model  # noqa: E402
from cellsynth.stain.simulate import simulate_stain_pairs  # noqa: E402
from cellsynth.stain.train import TrainConfig, _augment, train_stain  # noqa: E402

TINY = {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 4,
        "dropout": 0.0, "num_train_timesteps": 50}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return simulate_stain_pairs(tmp_path_factory.mktemp("pairs"), 4, seed=0, shape=(40, 40))


def cfg(**kw):
    base = dict(epochs=6, steps_per_epoch=5, batch_size=4, crop=16, lr=2e-3, ema_decay=0.9, seed=0, device="cpu",
                model=TINY)
    return TrainConfig(**{**base, **kw})


def test_training_lowers_the_loss_and_stores_normalisation(pairs, tmp_path):
    events = []
    res = train_stain(pairs, tmp_path / "m", config=cfg(steps_per_epoch=10, batch_size=8, lr=5e-3), progress=events.append)
    assert len(res.losses) == 6 and res.steps == 60
    assert np.mean(res.losses[-2:]) < 0.8 * res.losses[0]
    assert [e.step for e in events] == list(range(1, 61)) and events[-1].total == 60
    doc = io.read_json(tmp_path / "m" / "config.json")
    ds = read_stain_dataset(pairs)
    fl = np.concatenate([ds.load(i)[1].reshape(5, -1) for i in range(len(ds))], 1)
    np.testing.assert_allclose(doc["config"]["target_norm"]["low"], np.percentile(fl, 2, axis=1), rtol=1e-6)
    np.testing.assert_allclose(doc["config"]["target_norm"]["high"], np.percentile(fl, 98, axis=1), rtol=1e-6)
    assert doc["config"]["channel_names"] == ["DNA", "ER", "RNA", "AGP", "Mito"]
    lv = np.array(doc["config"]["mask_levels"])
    assert lv.shape == (5, 2) and np.all(lv[:, 1] > lv[:, 0])
    pipe = load_stain_model(tmp_path / "m", device="cpu")
    assert pipe(ds.load(0)[0], params=StainParams(steps=2, guidance=False)).images.shape == (5, 40, 40)


def test_checkpoint_resume_and_refusal(pairs, tmp_path):
    train_stain(pairs, tmp_path / "m", config=cfg(epochs=2, steps_per_epoch=2))
    assert (tmp_path / "m" / "checkpoint" / "state.safetensors").is_file()
    with pytest.raises(FileExistsError, match="resume"):
        train_stain(pairs, tmp_path / "m", config=cfg(epochs=2, steps_per_epoch=2))
    res = train_stain(pairs, tmp_path / "m", config=cfg(epochs=3, steps_per_epoch=2), resume=True)
    assert len(res.losses) == 3 and res.steps == 6
    assert io.read_json(tmp_path / "m" / "checkpoint" / "state.json")["epoch"] == 3
    with pytest.raises(FileNotFoundError, match="resume"):
        train_stain(pairs, tmp_path / "other", config=cfg(), resume=True)


def test_cancel_keeps_the_last_finished_epoch(pairs, tmp_path):
    def cancel(p):
        if p.step == 3:
            raise Cancelled()

    with pytest.raises(Cancelled):
        train_stain(pairs, tmp_path / "m", config=cfg(epochs=3, steps_per_epoch=2), progress=cancel)
    assert io.read_json(tmp_path / "m" / "checkpoint" / "state.json")["epoch"] == 1


def test_one_augmentation_for_all_planes_of_a_sample():
    rng = np.random.default_rng(0)
    base = rng.random((6, 6))
    stack = np.stack([base] * 8)
    for _ in range(10):
        out = _augment(stack, rng)
        assert all(np.array_equal(out[0], o) for o in out[1:])
        assert any(np.array_equal(out[0], t) for t in
                   [np.rot90(base, k) for k in range(4)] + [np.rot90(base, k)[:, ::-1] for k in range(4)])


def test_metrics_and_evaluation(pairs, tmp_path):
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(1)
    t = rng.random((2, 32, 32))
    p = np.clip(t + rng.normal(0, 0.1, t.shape), 0, 1)
    m = stain_metrics(p, t, ["A", "B"])
    assert m["channels"]["A"]["mse"] == pytest.approx(np.mean((p[0] - t[0]) ** 2))
    assert m["channels"]["B"]["mae"] == pytest.approx(np.mean(np.abs(p[1] - t[1])))
    assert m["channels"]["A"]["pcc"] == pytest.approx(np.corrcoef(p[0].ravel(), t[0].ravel())[0, 1])
    assert m["channels"]["A"]["ssim"] == pytest.approx(structural_similarity(t[0], p[0], data_range=1.0, win_size=7))
    assert m["average"]["pcc"] == pytest.approx((m["channels"]["A"]["pcc"] + m["channels"]["B"]["pcc"]) / 2)
    with pytest.raises(ValueError):
        stain_metrics(p, t[:1])
    train_stain(pairs, tmp_path / "m", config=cfg(epochs=1, steps_per_epoch=1))
    pipe = load_stain_model(tmp_path / "m", device="cpu")
    res = evaluate_stain(pairs, pipe, params=StainParams(steps=2, guidance=False), limit=2)
    assert res["n"] == 2 and set(res["channels"]) == {"DNA", "ER", "RNA", "AGP", "Mito"}
    assert set(res["average"]) == {"mse", "mae", "pcc", "ssim"}


def test_bad_train_config():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="save_dtype"):
        TrainConfig(save_dtype="int8")
