"""Training counters at tiny sizes: loss goes down, strategies, checkpoints, resume, metrics, CLI."""

import json

import numpy as np
import pytest
import torch

from cellsynth import io
from cellsynth.count import TrainConfig, count_cells, count_metrics, evaluate_counter, load_counter, train_counter
from cellsynth.count.data import load_count_data
from cellsynth.count.train import _Batcher, _loss
from cellsynth.layouts import LayoutParams, export_dataset, generate_layout
from cellsynth.progress import Cancelled

TINY = dict(backbone="test_efficientnet", blocks=3, crop=64, batch_size=4, lr=3e-3, lr_step=0)


def _pairs(n, seed, shape=(96, 96)):
    p = LayoutParams(shape=shape, count_mean=20, count_std=5, cell_size=10)
    return [(lay.image, lay.centres) for lay in (generate_layout(p, rng=[seed, i]) for i in range(n))]


@pytest.fixture(scope="module")
def real():
    return _pairs(6, 1)


@pytest.fixture(scope="module")
def synthetic():
    return _pairs(6, 2)


def test_a_few_training_steps_reduce_the_loss(real):
    cfg = TrainConfig(**TINY, epochs=3, steps_per_epoch=6, val_fraction=0)
    items = load_count_data(real)
    batch = _Batcher(cfg, items, [], [], np.random.default_rng(5)).labelled(1)
    torch.manual_seed(cfg.seed)
    from cellsynth.count._nets import build_net
    from cellsynth.count.models import counter_config

    untrained = build_net(counter_config("density", backbone="test_efficientnet", blocks=3)).eval()
    x, y = torch.from_numpy(batch[0]), torch.from_numpy(batch[1])
    with torch.no_grad():
        before = float(_loss(untrained, x, y, cfg))
    res = train_counter(items, config=cfg, device="cpu")
    with torch.no_grad():
        after = float(_loss(res.counter.net.eval(), x, y, cfg))
    assert after < 0.7 * before
    assert [r["epoch"] for r in res.history] == [1, 2, 3]


@pytest.mark.parametrize("strategy", ["finetune", "dual", "cutmix", "pseudo-label"])
def test_strategies_train_save_and_load_into_counting(tmp_path, real, synthetic, strategy):
    cfg = TrainConfig(**TINY, strategy=strategy, epochs=2, steps_per_epoch=2,
                      pretrain_epochs=1 if strategy == "finetune" else 0)
    kw = {"unlabelled": [(im, None) for im, _ in real]} if strategy == "pseudo-label" else {}
    seen = []
    res = train_counter(real if strategy != "pseudo-label" else None, synthetic=synthetic, out=tmp_path / "m",
                        config=cfg, device="cpu", progress=seen.append, **kw)
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "checkpoint" / "optimizer.pt").is_file()
    assert len(seen) == 4 and seen[-1].step == seen[-1].total == 4 and seen[-1].stage == "train"
    assert "val_mae" in res.history[-1] and np.isfinite(res.history[-1]["loss"])
    c = load_counter(tmp_path / "m", device="cpu")
    assert c.kind == "density" and c.config["training"]["config"]["strategy"] == strategy
    r = count_cells(real[0][0], counter=c)
    assert np.isfinite(r.count)
    if strategy == "pseudo-label":
        assert (tmp_path / "m" / "checkpoint" / "teacher.safetensors").is_file()


def test_missing_data_for_a_strategy_is_a_clear_error(real):
    with pytest.raises(ValueError, match="synthetic"):
        train_counter(real, config=TrainConfig(**TINY, strategy="dual"), device="cpu")
    with pytest.raises(ValueError, match="unlabelled"):
        train_counter(real, config=TrainConfig(**TINY, strategy="pseudo-label"), device="cpu")
    with pytest.raises(ValueError, match="pseudo-label"):
        TrainConfig(kind="regression", strategy="pseudo-label")
    with pytest.raises(ValueError, match="'DACS \\+ CutMix' row is 'cutmix'"):
        TrainConfig(strategy="dacs")
    with pytest.raises(ValueError, match="crop"):
        TrainConfig(crop=100)


def test_resume_continues_the_history_and_cancel_propagates(tmp_path, real):
    cfg = TrainConfig(**TINY, epochs=1, steps_per_epoch=2)
    train_counter(real, out=tmp_path / "m", config=cfg, device="cpu")
    first = io.read_json(tmp_path / "m" / "checkpoint" / "state.json")["history"]
    res = train_counter(real, out=tmp_path / "m", config=TrainConfig(**TINY, epochs=2, steps_per_epoch=2),
                        device="cpu", resume=True)
    assert [r["epoch"] for r in res.history] == [1, 2] and res.history[0] == first[0]

    def cancel(p):
        if p.step == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        train_counter(real, config=cfg, device="cpu", progress=cancel)
    with pytest.raises(FileNotFoundError, match="resume"):
        train_counter(real, out=tmp_path / "none", config=cfg, device="cpu", resume=True)


def test_regression_training_and_window_counts(real):
    cfg = TrainConfig(**{**TINY, "blocks": 1}, kind="regression", epochs=1, steps_per_epoch=2)
    res = train_counter(real, config=cfg, device="cpu")
    assert res.counter.kind == "regression" and res.counter.config["window"] == 64
    r = count_cells(real[0][0], counter=res.counter, diameter=None)
    assert len(r.windows) == 4 and r.points.shape == (0, 2)


def test_metrics_and_evaluate_counter_on_a_dataset(tmp_path):
    m = count_metrics([100, 104, 120, 0], [100, 100, 100, 0])
    assert m["mae"] == 6 and m["acp5"] == 0.75 and m["acp10"] == 0.75
    assert m["rmse"] == pytest.approx(np.sqrt((0 + 16 + 400 + 0) / 4))
    with pytest.raises(ValueError, match="same"):
        count_metrics([1, 2], [1])
    export_dataset(tmp_path / "ds", 3, params=LayoutParams(shape=(64, 64), count_mean=10, count_std=2), seed=3)
    seen = []
    ev = evaluate_counter(tmp_path / "ds", model="classic", progress=seen.append)
    truth = [it["n_cells"] for it in io.read_json(tmp_path / "ds" / "manifest.json")["items"]]
    assert ev["true"] == truth and len(ev["predicted"]) == 3 and len(seen) == 3
    assert ev["mae"] == pytest.approx(np.mean(np.abs(np.array(ev["predicted"]) - truth)))


# ----------------------------------------------------------------------------- CLI

def test_cli_count_json_csv_and_errors(tmp_path, capsys):
    from cellsynth.cli import main

    lay = generate_layout(LayoutParams(shape=(80, 90), count_mean=12, count_std=2), rng=4)
    io.write_tiff(tmp_path / "img.tif", lay.image)
    assert main(["count", str(tmp_path / "img.tif"), "--model", "classic", "--diameter", "15", "--json", "--quiet",
                 "--out", str(tmp_path / "pts.csv")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["count"] == len(doc["points"]) and all(len(p) == 2 for p in doc["points"])
    pts, feats = io.read_points_csv(tmp_path / "pts.csv")
    assert len(pts) == doc["count"] and "score" in feats
    assert main(["count", str(tmp_path / "img.tif"), "--model", "classic", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert int(out.split()[0]) >= 0 and "cells (diameter" in out and "estimated" in out
    assert main(["count", str(tmp_path / "missing.tif"), "--model", "classic"]) == 2
    assert "no such image" in capsys.readouterr().err
    assert main(["count", str(tmp_path / "img.tif"), "--model", str(tmp_path / "nomodel")]) == 2
    assert "no counter model" in capsys.readouterr().err


def test_cli_train_then_evaluate(tmp_path, capsys):
    from cellsynth.cli import main

    export_dataset(tmp_path / "ds", 4, params=LayoutParams(shape=(64, 64), count_mean=10, count_std=2), seed=5)
    rc = main(["train-counter", str(tmp_path / "ds"), "--out", str(tmp_path / "m"), "--backbone", "test_efficientnet",
               "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--crop", "64", "--device", "cpu",
               "--quiet"])
    assert rc == 0 and "saved to" in capsys.readouterr().out
    assert main(["evaluate-counter", str(tmp_path / "ds"), "--model", str(tmp_path / "m"), "--device", "cpu",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    for key in ("MAE", "RMSE", "ACP@5%", "ACP@10%"):
        assert key in out
    assert main(["evaluate-counter", str(tmp_path / "ds"), "--model", "classic", "--json", "--quiet"]) == 0
    assert set(json.loads(capsys.readouterr().out)) >= {"mae", "rmse", "acp5", "acp10"}
    assert main(["train-counter", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "no such training data" in capsys.readouterr().err


def test_finetune_stage_restarts_the_learning_rate_schedule(real, synthetic):
    # 12 pretraining epochs with x0.1 every 5 epochs would leave the fine-tuning
    # stage at 1e-3 * 0.01; the fine-tuning stage must start at the full rate.
    cfg = TrainConfig(backbone="test_efficientnet", blocks=3, crop=64, batch_size=4, lr=1e-3, lr_step=5,
                      lr_gamma=0.1, strategy="finetune", epochs=13, pretrain_epochs=12, steps_per_epoch=1,
                      val_fraction=0)
    res = train_counter(real, synthetic=synthetic, config=cfg, device="cpu")
    lrs = [r["lr"] for r in res.history]
    assert lrs[0] == pytest.approx(1e-3) and lrs[11] == pytest.approx(1e-5)
    assert lrs[12] == pytest.approx(1e-3)


def test_pretrained_backbone_from_local_weights_and_offline_error(tmp_path, real, monkeypatch):
    import timm
    from safetensors.torch import save_file

    from cellsynth.weights import WeightsNotFoundError

    torch.manual_seed(1)
    stand_in = timm.create_model("test_efficientnet", pretrained=False)  # 3-channel, 1000 classes
    (tmp_path / "w").mkdir()
    save_file({k: v.contiguous() for k, v in stand_in.state_dict().items()}, str(tmp_path / "w" / "model.safetensors"))
    cfg = TrainConfig(**{**TINY, "lr": 1e-12}, epochs=1, steps_per_epoch=1, val_fraction=0, pretrained=str(tmp_path / "w"))
    res = train_counter(real, config=cfg, device="cpu")
    net = res.counter.net.float()
    # RGB stem summed to one channel, the blocks unchanged; the decoder stays random
    assert torch.allclose(net.stem[0].weight[:, 0], stand_in.conv_stem.weight.sum(1), atol=1e-5)
    assert torch.allclose(net.blocks[1][0].conv_pwl.weight, stand_in.blocks[1][0].conv_pwl.weight, atol=1e-5)
    assert res.counter.config["pretrained"]["source"] == str(tmp_path / "w")
    random_init = train_counter(real, config=TrainConfig(**{**TINY, "lr": 1e-12}, epochs=1, steps_per_epoch=1,
                                                         val_fraction=0), device="cpu")
    assert not torch.allclose(random_init.counter.net.float().stem[0].weight[:, 0], stand_in.conv_stem.weight.sum(1))
    # "imagenet" offline with an empty cache: the product's error naming the model and how to provide it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(WeightsNotFoundError, match="efficientnet_b0-imagenet"):
        train_counter(real, config=TrainConfig(**TINY, epochs=1, steps_per_epoch=1, pretrained="imagenet"), device="cpu")


def test_train_counter_never_replaces_earlier_work_without_being_told(tmp_path, real):
    from cellsynth.cli import main

    cfg = TrainConfig(**TINY, epochs=1, steps_per_epoch=1, val_fraction=0)
    train_counter(real, config=cfg, out=tmp_path / "m", device="cpu")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--resume .*--overwrite"):
        train_counter(real, config=cfg, out=tmp_path / "m", device="cpu")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    train_counter(real, config=TrainConfig(**TINY, epochs=2, steps_per_epoch=1, val_fraction=0),
                  out=tmp_path / "m", device="cpu", resume=True)
    train_counter(real, config=cfg, out=tmp_path / "m", device="cpu", overwrite=True)
    io.write_tiff(tmp_path / "data" / "a.tif", real[0][0])
    io.write_points_csv(tmp_path / "data" / "a.csv", real[0][1])
    assert main(["train-counter", str(tmp_path / "data"), "--out", str(tmp_path / "m"), "--backbone",
                 "test_efficientnet", "--epochs", "1", "--quiet"]) == 2


def test_diverging_training_stops_and_saves_no_broken_model(tmp_path, real):
    cfg = TrainConfig(**{**TINY, "lr": 1e30}, epochs=3, steps_per_epoch=4, val_fraction=0)
    with pytest.raises(ValueError, match="diverged|NaN or infinite"):
        train_counter(real, config=cfg, out=tmp_path / "m", device="cpu")
    if (tmp_path / "m" / "model.safetensors").exists():  # an earlier epoch's model, if any, is finite
        load_counter(tmp_path / "m", device="cpu")


def test_non_finite_weights_are_never_saved_nor_loaded(tmp_path):
    from safetensors.torch import load_file, save_file

    from cellsynth.count.models import counter_config, new_counter, save_counter

    cfg = counter_config("density", backbone="test_efficientnet", blocks=3)
    c = new_counter(cfg, device="cpu")
    save_counter(c.net, cfg, tmp_path / "ok")
    state = load_file(str(tmp_path / "ok" / "model.safetensors"))
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key][...] = float("nan")
    save_file(state, str(tmp_path / "ok" / "model.safetensors"))
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_counter(tmp_path / "ok", device="cpu")
    with torch.no_grad():
        next(c.net.parameters()).fill_(float("inf"))
    with pytest.raises(ValueError, match="NaN or infinite"):
        save_counter(c.net, cfg, tmp_path / "bad")


def test_bad_ground_truth_is_refused(tmp_path):
    img = np.zeros((32, 40), np.uint8)
    with pytest.raises(ValueError, match="NaN"):
        load_count_data([(img, [[3.0, np.nan]])])
    with pytest.raises(ValueError, match="outside the 32x40 image"):
        load_count_data([(img, [[3.0, 55.0]])])
    io.write_tiff(tmp_path / "a.tif", img)
    io.write_tiff(tmp_path / "a_labels.tif", np.ones((32, 40), np.float32))
    with pytest.raises(TypeError, match="integer labels"):
        load_count_data(tmp_path)


def test_training_that_cannot_fit_in_memory_is_refused_before_loading(tmp_path, capsys):
    from cellsynth.cli import main

    with pytest.raises(ValueError, match="needs about .* --crop or --batch-size"):
        train_counter([(np.zeros((64, 64)), [[3.0, 3.0]])], config=TrainConfig(crop=4096), device="cpu")
    assert main(["train-counter", str(tmp_path / "missing"), "--out", str(tmp_path / "m"), "--crop", "4096"]) == 2
    assert not (tmp_path / "m").exists()
