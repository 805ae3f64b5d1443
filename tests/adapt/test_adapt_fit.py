"""Fitting a counter's point settings to corrected points: folds, cross-validation, and retraining's use of it."""

import numpy as np
import pytest

from cellsynth.adapt import AdaptParams, retrain_counter
from cellsynth.adapt.fit import GRID, fit_point_settings, fold_masks, with_settings
from cellsynth.count import count_cells, load_counter
from cellsynth.count.counter import Counter
from cellsynth.count.models import to_device
from cellsynth.count.synth import SynthParams, synthetic_nuclei

TINY = AdaptParams(crop=64, batch_size=2, n_layouts=3, n_holdout=2, layout_size=64, max_steps=2, min_steps=2)


@pytest.fixture(scope="module")
def cases():
    params = SynthParams(shape=(128, 128), diameter=(14.0, 14.0), coverage=(0.15, 0.25), plain_fraction=0.0)
    out = []
    for i in range(4):
        img, centres, _ = synthetic_nuclei(params, rng=[21, i])
        out.append(((img * 2000).clip(0, 65535).astype(np.uint16), centres))
    return out


def _with(counter, config):
    return to_device(Counter(kind="density", name="x", config=config, net=counter.net), "cpu")


def _error(counter, cases, diameter=14.0):
    return np.mean([abs(count_cells(im, counter=counter, diameter=diameter, engine="torch").count - len(c)) / len(c)
                    for im, c in cases])


def test_folds_cover_the_checked_area_once():
    boxes = [[(0, 0, 40, 60), (50, 10, 70, 30)], [(5, 5, 25, 45)]]
    folds = fold_masks([(80, 80), (30, 50)], boxes)
    assert len(folds) == 4
    for i, shape in enumerate([(80, 80), (30, 50)]):
        cover = sum(np.zeros(shape, int) if f[i] is None else f[i].astype(int) for f in folds)
        want = np.zeros(shape, int)
        for r0, c0, r1, c1 in boxes[i]:
            want[r0:r1, c0:c1] = 1
        np.testing.assert_array_equal(cover, want)
    three = fold_masks([(10, 10)] * 3, [[(0, 0, 10, 10)]] * 3)
    assert [[m is not None for m in f] for f in three] == [[True, False, False], [False, True, False],
                                                           [False, False, True]]


def test_a_wrong_nucleus_size_is_fitted_and_counts_other_images_better(cases):
    good = load_counter("default", device="cpu")
    wrong = _with(good, with_settings(good.config, {"diameter_scale": 1.6}))  # takes 14 px nuclei for 22 px ones
    train, held_out = cases[:2], cases[2:]
    fit = fit_point_settings(wrong, [im for im, _ in train], [c for _, c in train],
                             [[(0, 0, 128, 128)]] * 2, 14.0)
    assert fit.accepted and fit.cv_loss < fit.base_cv_loss
    assert fit.base["diameter_scale"] == 1.6 and fit.settings["diameter_scale"] in GRID["diameter_scale"]
    assert _error(_with(good, fit.config), held_out) < _error(wrong, held_out)


def test_corrections_that_confirm_the_counter_keep_its_settings(cases):
    base = load_counter("default", device="cpu")
    imgs = [im for im, _ in cases[:2]]
    own = [count_cells(im, counter=base, diameter=14.0, engine="torch").points for im in imgs]
    fit = fit_point_settings(base, imgs, own, [[(0, 0, 128, 128)]] * 2, 14.0)
    assert not fit.accepted and fit.base_cv_loss == 0.0
    assert fit.settings == fit.base and fit.config == base.config


def test_retraining_keeps_fitted_settings_when_the_network_is_not_better(cases, monkeypatch, one_torch_thread):
    from cellsynth.adapt import retrain as retrain_mod

    def no_gain(net, sample, *, on_check, **kw):  # "training" that never validates better
        on_check(net.eval(), 1)
        return net.eval(), {"steps": 1, "seconds": 0.0, "loss_first": None, "loss_last": None}

    monkeypatch.setattr(retrain_mod, "finetune", no_gain)
    good = load_counter("default", device="cpu")
    wrong = _with(good, with_settings(good.config, {"diameter_scale": 1.6}))
    res = retrain_counter([im for im, _ in cases[:2]], [c for _, c in cases[:2]], out=None, base=wrong,
                          diameter=14.0, minutes=0.05, device="cpu", params=TINY)
    assert res.accepted and not res.report["network_accepted"]
    assert res.report["point_settings"]["accepted"]
    assert res.report["decision"].startswith("accepted: point settings fitted: diameter_scale 1.6 -> ")
    assert res.counter.config["diameter_scale"] != 1.6
    assert _error(res.counter, cases[2:]) < _error(wrong, cases[2:])


def test_a_nucleus_on_the_strips_edge_is_no_validation_error():
    from skimage.draw import disk

    from cellsynth.adapt.checked import validation_error

    img = np.zeros((40, 100), np.uint8)
    for c in (20, 50, 80):
        img[disk((20, c), 6)] = 200
    truth = np.array([[20.0, 20.0], [20.0, 51.2], [20.0, 80.0]])  # annotated just inside the strip
    strip = [[(0, 51, 40, 100)]]
    v = validation_error(load_counter("classic"), [img], [truth], strip, 12.0)
    assert v["n_true"] == 2 and v["count_error"] == 0.5  # the counted point (col 50) falls outside the strip
    assert v["error"] == 0.0 and v["misses"] == v["extras"] == 0 and v["f1"] == 1.0
    v = validation_error(load_counter("classic"), [img], [truth[[0, 2]]], strip, 12.0)  # a cell not annotated
    assert v["extras"] == 0 and v["misses"] == 0 and v["n_true"] == 1  # its point lies outside the strip
    wrong = truth.copy()
    wrong[2] = (5.0, 95.0)  # annotated where no nucleus is: a miss and an extra point in the strip
    v = validation_error(load_counter("classic"), [img], [wrong], strip, 12.0)
    assert (v["misses"], v["extras"]) == (1, 1) and v["error"] == 1.0
