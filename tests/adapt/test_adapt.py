"""Label-free adaptation and retraining from corrections, at tiny sizes on the CPU."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from cellsynth import io
from cellsynth.adapt import (AdaptParams, adapt_counter, estimate_image_stats, fast_stylize, retrain_counter,
                             style_distance)
from cellsynth.adapt import adapt as adapt_mod
from cellsynth.adapt._train import crop_item, make_item, masked_density_loss
from cellsynth.adapt.checked import region_mask
from cellsynth.cli import main
from cellsynth.count import count_cells, load_counter
from cellsynth.count.models import counter_config, save_counter
from cellsynth.count.synth import SynthParams, synthetic_nuclei
from cellsynth.progress import Cancelled

TINY = AdaptParams(crop=64, batch_size=2, n_layouts=3, n_holdout=2, layout_size=64, max_steps=2, min_steps=2)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from cellsynth.count._nets import build_net

    torch.manual_seed(0)
    cfg = counter_config("density", backbone="test_efficientnet", blocks=3)
    return save_counter(build_net(cfg), cfg, tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="module")
def images():
    params = SynthParams(shape=(96, 96), diameter=(11.0, 13.0), coverage=(0.2, 0.3), plain_fraction=0.0)
    out = []
    for i in range(2):
        img, centres, _ = synthetic_nuclei(params, rng=[3, i])
        out.append(((img * 1000).clip(0, 65535).astype(np.uint16), centres))
    return out


def _disks(d=14, step=32, shape=(128, 128)):
    from skimage.draw import disk

    img = np.zeros(shape, np.float32)
    centres = []
    for r in range(step // 2, shape[0], step):
        for c in range(step // 2, shape[1], step):
            img[disk((r, c), d / 2)] = 1.0
            centres.append((r, c))
    return img, np.array(centres, float)


def test_image_stats_find_size_density_and_foreground():
    img, centres = _disks()
    s = estimate_image_stats(img)
    assert abs(s["diameter"] - 14) < 1.5
    assert s["count_estimate"] == len(centres) == 16
    assert s["density"] == pytest.approx(16 / img.size * 1e4)
    assert s["foreground_fraction"] == pytest.approx(img.mean(), rel=0.2)
    assert estimate_image_stats(img, diameter=20.0)["diameter"] == 20.0
    with pytest.raises(ValueError, match="diameter"):
        estimate_image_stats(img, diameter=-3)


def test_fast_stylize_moves_statistics_towards_the_reference():
    params = SynthParams(shape=(128, 128), diameter=(12, 12), coverage=(0.2, 0.2), plain_fraction=1.0)
    layout, centres, _ = synthetic_nuclei(params, rng=1)
    # The reference: other cells, dim and noisy on a bright uneven background, 12-bit range.
    ref_cells, _, _ = synthetic_nuclei(params, rng=2)
    rng = np.random.default_rng(0)
    yy = np.linspace(0, 1, 200)[:, None]
    ref = 400 + 300 * yy + 200 * ref_cells[:, :].repeat(2, 0)[:200, :128] + rng.normal(0, 30, (200, 128))
    out = fast_stylize(layout, ref, rng=0)
    assert out.shape == layout.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out, fast_stylize(layout, ref, rng=0))
    before, after = style_distance(layout, ref), style_distance(out, ref)
    assert after["histogram"] < 0.25 * before["histogram"]
    assert after["noise"] < before["noise"]
    # The cells stay where they were.
    from skimage.draw import disk

    inside = np.zeros(layout.shape, bool)
    for r, c in centres:
        inside[disk((r, c), 3, shape=layout.shape)] = True
    assert out[inside].mean() > out[~inside].mean() + 2 * out[~inside].std() / 4


def test_masked_loss_ignores_errors_outside_the_checked_region():
    rng = np.random.default_rng(0)
    target = torch.from_numpy(rng.random((2, 1, 32, 32)).astype(np.float32))
    mask = torch.zeros_like(target)
    mask[:, :, 4:20, 8:24] = 1
    pred = target.clone().requires_grad_(True)
    wrong = (target + 5.0 * (1 - mask)).clone().requires_grad_(True)
    a = masked_density_loss(pred, target, mask, scale=100.0)
    b = masked_density_loss(wrong, target, mask, scale=100.0)
    assert float(a.detach()) == pytest.approx(float(b.detach()), abs=1e-7) == pytest.approx(0.0, abs=1e-7)
    bad_inside = (target + 0.5 * mask).clone().requires_grad_(True)
    loss = masked_density_loss(bad_inside, target, mask, scale=100.0)
    assert float(loss.detach()) > 0.01
    loss.backward()
    assert torch.all(bad_inside.grad[mask == 0] == 0) and torch.any(bad_inside.grad[mask == 1] != 0)
    # Without a mask it is the counting loss.
    from cellsynth.count._nets import density_loss

    with torch.no_grad():
        assert float(masked_density_loss(bad_inside, target, None, scale=100.0)) == pytest.approx(
            float(density_loss(bad_inside, target, scale=100.0)), rel=1e-5)


def test_crops_over_a_box_overlap_it():
    img, centres = _disks(shape=(200, 200))
    item = make_item(img, centres, counter_config("density"), region_mask(img.shape, [(150, 150, 180, 190)]))
    rng = np.random.default_rng(0)
    for _ in range(20):
        _, tgt, msk = crop_item(item, 64, rng, box=(150, 150, 180, 190))
        assert msk.sum() > 0 and tgt.shape == (64, 64)


def test_adapt_writes_a_counter_that_counts_and_says_what_it_did(tmp_path, tiny_model, images, one_torch_thread):
    seen = []
    out = tmp_path / "adapted"
    res = adapt_counter([im for im, _ in images], out=out, base=tiny_model, minutes=0.05, stylize="fast",
                        device="cpu", progress=seen.append, params=TINY)
    assert res.path == out and (out / "model.safetensors").is_file() and (out / "adapt_report.json").is_file()
    c = load_counter(out, device="cpu")
    assert np.isfinite(count_cells(images[0][0], counter=c, diameter=12.0).density.sum())
    r = json.loads((out / "adapt_report.json").read_text())
    for key in ("accepted", "decision", "diameter", "stats", "stylization", "n_layouts", "seconds", "score_before",
                "score_after", "counts_before", "counts_after", "working_scale"):
        assert key in r, key
    assert r["decision"].startswith("accepted" if r["accepted"] else "kept the base: ")
    assert r["stylization"] == "fast" and r["n_layouts"] == 3 and r["training"]["steps"] == 2
    assert 9 < r["diameter"]["used"] < 16 and r["seconds"]["total"] > 0
    assert len(res.counts_before) == len(res.counts_after) == 2
    assert c.config["training"]["operation"] == "adapt-counter"
    stages = {p.stage for p in seen}
    assert {"stats", "layouts", "count before", "train", "check"} <= stages
    # The folder is refused a second time, and replaced on request.
    with pytest.raises(FileExistsError, match="not empty"):
        adapt_counter([images[0][0]], out=out, base=tiny_model, minutes=0.05, device="cpu", params=TINY)
    res2 = adapt_counter([images[0][0]], out=out, base=tiny_model, minutes=0.05, device="cpu", params=TINY,
                         overwrite=True, stylize="fast")
    assert res2.report["n_images"] == 1 and json.loads((out / "adapt_report.json").read_text())["n_images"] == 1
    assert sorted(os.listdir(tmp_path)) == ["adapted"]  # no temporary folders left behind


def test_adapt_keeps_the_base_when_the_candidate_is_worse(tmp_path, tiny_model, images, monkeypatch, one_torch_thread):
    def broken(net, sample, **kw):  # a candidate that predicts no cells at all
        with torch.no_grad():
            net.head.weight.zero_()
            net.head.bias.fill_(-1.0)
        return net.eval(), {"steps": 0, "seconds": 0.0, "loss_first": None, "loss_last": None}

    monkeypatch.setattr(adapt_mod, "finetune", broken)
    base = load_counter("default", device="cpu")  # a base that counts these images well
    res = adapt_counter([im for im, _ in images], out=tmp_path / "m", base=base, minutes=0.05, stylize="fast",
                        device="cpu", params=TINY)
    assert not res.accepted and res.counter.net is base.net and res.counter.path == tmp_path / "m"
    assert res.report["score_after"]["score"] >= res.report["score_before"]["score"]
    saved = load_counter(tmp_path / "m", device="cpu")
    for k, v in base.net.state_dict().items():
        got = saved.net.state_dict()[k]
        torch.testing.assert_close(got, v.to(got.dtype))
    assert saved.diameter == base.diameter and saved.config["training"]["accepted"] is False


def test_cancelled_adaptation_writes_nothing(tmp_path, tiny_model, images, one_torch_thread):
    def cancel(p):
        if p.stage == "train":
            raise Cancelled()

    with pytest.raises(Cancelled):
        adapt_counter([images[0][0]], out=tmp_path / "m", base=tiny_model, minutes=0.05, device="cpu",
                      progress=cancel, params=TINY)
    assert os.listdir(tmp_path) == []


def test_bad_inputs_are_clear_errors(tmp_path, tiny_model, images):
    img = images[0][0]
    with pytest.raises(ValueError, match="stylize='inst'"):
        adapt_counter([img], out=None, base=tiny_model, stylize="inst", device="cpu")
    with pytest.raises(ValueError, match="stylize must be one of"):
        adapt_counter([img], out=None, base=tiny_model, stylize="magic", device="cpu")
    with pytest.raises(TypeError, match="sequence"):
        adapt_counter(img, out=None, base=tiny_model)
    with pytest.raises(ValueError, match="minutes"):
        adapt_counter([img], out=None, base=tiny_model, minutes=0)
    with pytest.raises(ValueError, match="classic"):
        adapt_counter([img], out=None, base="classic", device="cpu", stylize="fast")
    with pytest.raises(ValueError, match=r"points\[0\]"):
        retrain_counter([img], [np.zeros((3, 3))], out=None, base=tiny_model)
    with pytest.raises(ValueError, match="empty inside the image"):
        retrain_counter([img], [images[0][1]], out=None, base=tiny_model, regions=[[(50, 50, 40, 60)]])
    with pytest.raises(ValueError, match="crop"):
        AdaptParams(crop=100)


def _loss_spy(monkeypatch, batches: int, seen: dict | None = None) -> list:
    """Replace retraining's fine-tuning by a probe: the base's loss on the same sampled batches, per run."""
    from cellsynth.adapt import retrain as retrain_mod
    losses = []

    def spy(net, sample, **kw):
        rng = np.random.default_rng(7)
        if seen is not None:
            seen.update(kw)
        with torch.no_grad():
            vals = []
            for _ in range(batches):
                x, y, m = sample(rng, None)
                vals.append(float(masked_density_loss(net(torch.from_numpy(x)), torch.from_numpy(y),
                                                      None if m is None else torch.from_numpy(m), scale=100.0)))
        losses.append(vals)
        return net.eval(), {"steps": 0, "seconds": 0.0, "loss_first": None, "loss_last": None}

    monkeypatch.setattr(retrain_mod, "finetune", spy)
    monkeypatch.setattr(retrain_mod, "_worth_training", lambda run: True)  # train whatever can be held out
    return losses


def test_retraining_ignores_points_outside_the_checked_region(tiny_model, images, monkeypatch, one_torch_thread):
    losses = _loss_spy(monkeypatch, 4)
    img, centres = images[0]

    def near(r0, c0):  # true points well inside the 48 px box at (r0, c0)
        return centres[(np.abs(centres[:, 0] - r0 - 24) < 16) & (np.abs(centres[:, 1] - c0 - 24) < 16)]

    r0, c0 = max([(0, 0), (0, 48), (48, 0), (48, 48)], key=lambda rc: len(near(*rc)))
    inside = near(r0, c0)
    assert len(inside) >= 2
    far = (96 - 24 - r0, 96 - 24 - c0)  # the centre of the opposite quadrant
    junk = np.array([far, (far[0] + 6, far[1] - 8), (far[0] - 8, far[1] + 6)], float)  # wrong points outside the box

    def run(points):
        retrain_counter([img], [points], out=None, base=tiny_model, regions=[[(r0, c0, r0 + 48, c0 + 48)]],
                        diameter=12.0, minutes=0.05, device="cpu", params=dataclasses.replace(TINY, replay_share=0.0))

    run(inside)
    run(np.concatenate([inside, junk]))
    run(inside[1:])  # one true point inside the box removed
    assert losses[0] == pytest.approx(losses[1], abs=1e-9)
    assert losses[0] != pytest.approx(losses[2], abs=1e-6)


def test_retraining_holds_out_a_validation_strip(tiny_model, images, monkeypatch, one_torch_thread):
    seen = {}
    losses = _loss_spy(monkeypatch, 6, seen)
    img, centres = images[0]
    strip = centres[:, 1] >= 72 - 0.5  # the last quarter of the columns, 24 px = two nuclei wide
    assert strip.sum() >= 2 and (centres[:, 1] < 40).any()

    def run(points):
        return retrain_counter([img], [points], out=None, base=tiny_model, diameter=12.0, minutes=0.05,
                               device="cpu", params=dataclasses.replace(TINY, replay_share=0.0))

    res = run(centres)
    run(centres[~strip])  # the held-out points removed: training sees the same targets
    run(np.delete(centres, int(np.argmax(centres[:, 1] < 40)), axis=0))  # a trained point removed
    assert losses[0] == pytest.approx(losses[1], abs=1e-9)
    assert losses[0] != pytest.approx(losses[2], abs=1e-6)
    assert res.report["validation_regions"] == [[[0, 72, 96, 96]]]
    assert res.report["score_before"]["validation"]["n_true"] == int(strip.sum())
    assert seen["freeze_bn"] is True and seen["checks"] > 0
    assert not res.accepted  # no training happened: the base is kept


def _blind(counter_or_net):
    """A counter (or network) whose density is zero everywhere: it finds no cells."""
    net = getattr(counter_or_net, "net", counter_or_net)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.fill_(-1.0)
    return counter_or_net


def test_retraining_keeps_the_state_that_counts_the_validation_strip_best(images, monkeypatch, one_torch_thread):
    from cellsynth.adapt import retrain as retrain_mod
    good = load_counter("default", device="cpu")
    good_state = {k: v.clone() for k, v in good.net.state_dict().items()}
    base = _blind(load_counter("default", device="cpu"))  # a base that finds no cells

    def train(net, sample, *, on_check, **kw):
        net.load_state_dict(good_state)  # "training" repairs the network: validates better
        on_check(net.eval(), 1)
        _blind(net)  # then over-fits into a network that finds no cells again
        on_check(net.eval(), 2)
        return net.eval(), {"steps": 2, "seconds": 0.0, "loss_first": None, "loss_last": None}

    monkeypatch.setattr(retrain_mod, "finetune", train)
    monkeypatch.setattr(retrain_mod, "WEAK_VALIDATION", 1)  # the tiny strip holds a few cells: enough here
    img, centres = images[0]
    res = retrain_counter([img], [centres], out=None, base=base, diameter=12.0, minutes=0.05, device="cpu",
                          params=TINY)
    hist = res.report["training"]["validation"]
    assert [h["step"] for h in hist] == [1, 2] and hist[0]["score"] < hist[1]["score"]
    assert res.report["training"]["best_step"] == 1
    assert res.accepted and res.counts_after[0] > res.counts_before[0]
    for k, v in res.counter.net.state_dict().items():
        torch.testing.assert_close(v.float(), good_state[k].float())


def test_retrain_cli_writes_a_counter_and_reports(tmp_path, tiny_model, images, capsys, one_torch_thread):
    img, centres = images[0]
    io.write_tiff(tmp_path / "a.tif", img)
    io.write_points_csv(tmp_path / "a.csv", centres)
    out = tmp_path / "m"
    args = ["retrain-counter", str(tmp_path / "a.tif"), str(tmp_path / "a.csv"), "--out", str(out),
            "--base", str(tiny_model), "--minutes", "0.05", "--region", "0", "0", "64", "64",
            "--device", "cpu", "--json", "--quiet"]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["operation"] == "retrain-counter" and doc["regions"] == [[[0, 0, 64, 64]]]
    assert load_counter(out, device="cpu").kind == "density"
    rec = json.loads((out / "provenance.json").read_text())  # the files it came from, the base and the decision
    assert rec["operation"] == "retrain-counter" and [f["name"] for f in rec["inputs"]] == ["a.tif", "a.csv"]
    assert len(rec["inputs"][0]["sha256"]) == 64 and rec["model"]["sha256"] and rec["result"]["decision"]
    assert main(args) == 2  # out exists now
    assert "error:" in capsys.readouterr().err
    assert main(args[:2] + args[3:]) == 2  # an image without its points file
    assert main(["adapt-counter", str(tmp_path / "missing.tif"), "--out", str(tmp_path / "x")]) == 2
    assert "no such image" in capsys.readouterr().err


def test_a_retrained_network_needs_enough_held_out_cells(images, monkeypatch, one_torch_thread):
    from cellsynth.adapt import retrain as retrain_mod
    good = load_counter("default", device="cpu")
    good_state = {k: v.clone() for k, v in good.net.state_dict().items()}
    base = _blind(load_counter("default", device="cpu"))  # a base that finds no cells

    def repair(net, sample, *, on_check, **kw):  # "training" that validates better
        net.load_state_dict(good_state)
        on_check(net.eval(), 1)
        return net.eval(), {"steps": 1, "seconds": 0.0, "loss_first": None, "loss_last": None}

    monkeypatch.setattr(retrain_mod, "finetune", repair)
    img, centres = images[0]
    res = retrain_counter([img], [centres], out=None, base=base, diameter=12.0, minutes=0.05, device="cpu",
                          params=TINY)
    n = res.report["score_before"]["validation"]["n_true"]
    assert 0 < n < retrain_mod.WEAK_VALIDATION
    assert not res.report["network_accepted"] and res.counts_after == res.counts_before
    assert res.report["training"]["steps"] == 0 and "can be held out" in res.report["training"]["skipped"]
    assert f"needs at least {retrain_mod.WEAK_VALIDATION} held-out cells" in res.report["decision"]
