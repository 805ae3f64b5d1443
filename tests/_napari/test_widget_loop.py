"""The Counting loop widget driven as a person would: adapt, count, correct, retrain, count all; Cancel."""

import dataclasses
import json
import time

import numpy as np
import pytest

from cellsynth._napari._models import recent_models, remember_model
from cellsynth.count import load_counter
from cellsynth._napari.count_widget import CountWidget
from cellsynth._napari.loop_widget import LoopWidget, regions_name
from cellsynth._napari._counting import result_name
from cellsynth.layouts import LayoutParams, generate_layout


@pytest.fixture(autouse=True)
def _data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLSYNTH_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch

    from cellsynth.count._nets import build_net
    from cellsynth.count.models import counter_config, save_counter

    torch.manual_seed(0)
    cfg = counter_config("density", backbone="test_efficientnet", blocks=3)
    return save_counter(build_net(cfg), cfg, tmp_path_factory.mktemp("tiny") / "base")


def _image(seed=3, shape=(96, 128)):
    return generate_layout(LayoutParams(shape=shape, count_mean=20, count_std=0, max_overlap=0.0, noise_std=2.0),
                           rng=seed).image


def _click(qtbot, w, button, timeout=120000):
    with qtbot.waitSignal(w.runner.finished, timeout=timeout) as blocker:
        button.native.click()
    return blocker.args[0]


def _fake_adapt(tiny_model, calls, delay=0.0, accepted=True):
    """Stands in for adapt_counter: saves a copy of the tiny counter where asked, with a report."""
    from cellsynth.adapt import AdaptResult
    from cellsynth.count import load_counter
    from cellsynth.progress import Progress

    def fake(images, *, out, progress=None, **kw):
        calls.append({"images": images, "out": out, **kw})
        for i in range(20):
            if progress is not None:
                progress(Progress("train", i + 1, 20))
            time.sleep(delay)
        out.mkdir(parents=True)
        for f in ("model.safetensors", "config.json"):
            (out / f).write_bytes((tiny_model / f).read_bytes())
        (out / "adapt_report.json").write_text(json.dumps({"diameter": {"used": 14.0}}))
        decision = "accepted: a lower label-free score" if accepted else "kept the base: no lower label-free score"
        return AdaptResult(counter=load_counter(out, device="cpu"), path=out, accepted=accepted,
                           report={"diameter": {"used": 14.0}, "decision": decision}, counts_before=[162],
                           counts_after=[125 if accepted else 162])

    return fake


def test_adapted_counter_is_saved_listed_and_counts(open_dock, make_napari_viewer, qtbot, monkeypatch, tiny_model, _data_dir):
    import cellsynth.adapt

    calls = []
    monkeypatch.setattr(cellsynth.adapt, "adapt_counter", _fake_adapt(tiny_model, calls))
    viewer = make_napari_viewer()
    viewer.add_image(_image(), name="nuclei", scale=(2.0, 2.0))
    loop = open_dock(viewer, "Counting loop")
    count = open_dock(viewer, "Count cells")
    assert loop.diameter.arg() == "auto"
    assert _click(qtbot, loop, loop.adapt_button) == "done"
    out = calls[0]["out"]
    assert calls[0]["diameter"] == "auto" and len(calls[0]["images"]) == 1
    assert out.parent == _data_dir / "models" and out.name.startswith("nuclei-adapted-")
    assert (out / "model.safetensors").is_file()
    assert "162 → 125" in loop.result_label.text()
    assert loop.model.value == str(out) and loop.diameter.value.value == 14.0
    # offered in the Count cells widget's model list too, and remembered for the next session
    assert str(out) in count.model.choices
    assert [e["path"] for e in recent_models()] == [str(out)]
    assert [lay.name for lay in viewer.layers] == ["nuclei"]  # adapting adds no layer
    # a second adaptation never overwrites the first
    assert _click(qtbot, loop, loop.adapt_button) == "done"
    assert calls[1]["out"] != out and out.is_dir() and len(recent_models()) == 2
    # step 3 counts with the selected (adapted) counter
    loop.model.value = str(out)
    assert _click(qtbot, loop, loop.count_button) == "done"
    pts = viewer.layers[result_name("nuclei")]
    assert pts.metadata["cellsynth"]["path"] == str(out) and tuple(pts.scale) == (2.0, 2.0)
    n = len(pts.data)
    assert loop.count_label.text().startswith(f"Count: {n} ")
    # clicks on the layer: the count in both docks (opened from the Plugins menu) follows at once
    pts.add([[1.0, 1.0], [2.0, 60.0], [60.0, 2.0]])
    pts.selected_data = {0, 1}
    pts.remove_selected()
    assert pts.metadata["count"] == n + 1
    assert loop.count_label.text().startswith(f"Count: {n + 1} ")
    count.image.value = viewer.layers["nuclei"]
    pts.add([[3.0, 3.0]])
    assert count.count_label.text().startswith(f"Count: {n + 2} ")
    assert loop.count_label.text().startswith(f"Count: {n + 2} ")


def test_cancel_leaves_layers_and_models_untouched(open_dock, make_napari_viewer, qtbot, monkeypatch, tiny_model, _data_dir):
    import cellsynth.adapt

    calls = []
    monkeypatch.setattr(cellsynth.adapt, "adapt_counter", _fake_adapt(tiny_model, calls, delay=0.2))
    viewer = make_napari_viewer()
    viewer.add_image(_image(), name="nuclei")
    viewer.add_points(np.array([[5.0, 5.0]]), name=result_name("nuclei"))
    loop = open_dock(viewer, "Counting loop")
    before = [(lay.name, np.asarray(lay.data).copy()) for lay in viewer.layers]
    with qtbot.waitSignal(loop.runner.finished, timeout=60000) as blocker:
        loop.adapt_button.native.click()
        qtbot.waitUntil(lambda: loop.runner.bar.maximum() == 20, timeout=20000)
        loop.runner.cancel_button.click()
    assert blocker.args[0] == "cancelled"
    after = [(lay.name, np.asarray(lay.data)) for lay in viewer.layers]
    assert [n for n, _ in after] == [n for n, _ in before]
    assert all(np.array_equal(d1, d2) for (_, d1), (_, d2) in zip(before, after))
    assert not (_data_dir / "models").exists() or not any((_data_dir / "models").iterdir())
    assert recent_models() == [] and loop.model.value == "default" and loop.result_label.text() == ""


def seen_report(folder) -> dict:
    return json.loads((folder / "adapt_report.json").read_text())


def test_correct_mark_regions_and_retrain(open_dock, make_napari_viewer, qtbot, monkeypatch, tiny_model, _data_dir,
                                          one_torch_thread):
    """Count (classic), correct by hand, mark a checked box, retrain the tiny counter for real."""
    import cellsynth.adapt
    from cellsynth.adapt import AdaptParams

    real = cellsynth.adapt.retrain_counter
    seen = []

    def spy(images, points, **kw):
        seen.append({"points": points, **kw})
        return real(images, points, **kw)

    monkeypatch.setattr(cellsynth.adapt, "retrain_counter", spy)
    from cellsynth.adapt import fit as fit_mod, retrain as retrain_mod

    def fitted(counter, *a, **kw):  # the 48 px box is too small to hold out cells: the settings fit is what changes
        cfg = fit_mod.with_settings(counter.config, {"peak_threshold": 0.45})
        return fit_mod.FitResult(settings={"peak_threshold": 0.45}, base={"peak_threshold": 0.3}, accepted=True,
                                 cv_loss=0.1, base_cv_loss=0.2, config=cfg)

    monkeypatch.setattr(retrain_mod, "_fit_settings", fitted)
    monkeypatch.setattr(retrain_mod, "_worth_training", lambda run: True)  # trained, though it cannot be kept
    viewer = make_napari_viewer()
    viewer.add_image(_image(shape=(96, 96)), name="nuclei")
    loop = open_dock(viewer, "Counting loop")
    remember_model(tiny_model, kind="adapted", image="nuclei")  # as if adapted earlier
    assert str(tiny_model) in loop.model.choices
    loop.model.value = "classic"
    loop.diameter.value.value = 15.0
    assert _click(qtbot, loop, loop.count_button) == "done"
    pts = viewer.layers[result_name("nuclei")]
    n = len(pts.data)
    pts.add([[40.0, 40.0]])
    pts.selected_data = {0}
    pts.remove_selected()
    # step 4: a rectangle layer ready to draw in
    loop.regions_button.native.click()
    shapes = viewer.layers[regions_name("nuclei")]
    assert shapes.mode == "add_rectangle" and viewer.layers.selection.active is shapes
    shapes.add_rectangles(np.array([[0.0, 0.0], [47.6, 47.6]]))
    # step 5 with tiny settings
    loop.model.value = str(tiny_model)
    loop.params = AdaptParams(crop=64, batch_size=2, n_layouts=3, n_holdout=2, layout_size=64, max_steps=2,
                              min_steps=2)
    loop.retrain_minutes.value = 0.05
    assert loop.curves.canvas is None  # the plot is made when there is something to draw, not as the dock opens
    assert _click(qtbot, loop, loop.retrain_button, timeout=240000) == "done", loop.runner.last_error
    assert seen[0]["regions"] == [[(0, 0, 48, 48)]] and seen[0]["base"] == str(tiny_model)
    assert len(seen[0]["points"][0]) == n and [40.0, 40.0] in seen[0]["points"][0].tolist()
    out = seen[0]["out"]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert load_counter(out).settings.peak_threshold == 0.45
    assert out.name.startswith("nuclei-retrained-") and loop.model.value == str(out)
    assert "Retrained counter saved" in loop.result_label.text() and "→" in loop.result_label.text()
    steps = seen_report(out)["training"]["steps"]  # the curves of the run: one loss per training step
    assert loop.curves.isVisibleTo(loop) and len(loop.curves.series["loss"]) == steps > 0
    assert loop.curves.canvas is not None and loop.curves.figure.axes
    assert recent_models()[0]["path"] == str(out)


def test_count_all_open_images_keeps_edits(open_dock, make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    viewer.add_image(_image(3), name="a")
    viewer.add_image(_image(4), name="b")
    loop = open_dock(viewer, "Counting loop")
    loop.model.value = "classic"
    assert _click(qtbot, loop, loop.count_all_button) == "done"
    pa, pb = viewer.layers[result_name("a")], viewer.layers[result_name("b")]
    assert len(pa.data) > 5 and len(pb.data) > 5
    assert pa.metadata["diameter_source"] == "estimated" and pb.metadata["count"] == len(pb.data)
    assert f"a: {len(pa.data)}" in loop.result_label.text() and f"b: {len(pb.data)}" in loop.result_label.text()
    table = loop.images_table  # one row per image, exported as CSV, a click selects that image's result
    assert table.isVisibleTo(loop) and table.table.rowCount() == 2
    assert [table.table.item(i, 1).text() for i in range(2)] == [str(len(pa.data)), str(len(pb.data))]
    table.table.cellClicked.emit(1, 0)
    assert viewer.layers.selection.active is pb
    out = table.export(str(tmp_path / "counts.csv"))
    assert out.read_text().splitlines()[:2] == ["image,count,diameter",
                                                f"a,{len(pa.data)},{pa.metadata['diameter_used']}"]
    pb.add([[3.0, 3.0]])
    assert pb.metadata["count"] == len(pb.data)
    n_b = len(pb.data)
    assert _click(qtbot, loop, loop.count_all_button) == "done"
    assert len(pb.data) == n_b and [3.0, 3.0] in pb.data.tolist()


def test_loop_widget_is_contributed():
    from pathlib import Path

    from npe2 import PluginManifest

    m = PluginManifest.from_file(Path(__file__).resolve().parents[2] / "napari.yaml")
    assert "Counting loop" in {w.display_name for w in m.contributions.widgets}
    cmd = {c.id: c.python_name for c in m.contributions.commands}["napari-cellsynth.loop_widget"]
    assert cmd == "cellsynth._napari.loop_widget:LoopWidget"


def test_real_nuclei_sample_is_shipped():
    from cellsynth._napari.sample import sample_nuclei

    [(data, kwargs, kind)] = sample_nuclei()
    assert kind == "image" and data.shape == (383, 512) and data.dtype == np.uint8
    assert "BSD-3" in kwargs["metadata"]["source"]


def test_an_adaptation_that_did_not_beat_the_base_saves_and_selects_nothing(open_dock, make_napari_viewer, qtbot,
                                                                           monkeypatch, tiny_model, _data_dir):
    import cellsynth.adapt

    calls = []
    monkeypatch.setattr(cellsynth.adapt, "adapt_counter", _fake_adapt(tiny_model, calls, accepted=False))
    viewer = make_napari_viewer()
    viewer.add_image(_image(), name="nuclei")
    loop = open_dock(viewer, "Counting loop")
    assert _click(qtbot, loop, loop.adapt_button) == "done"
    text = loop.result_label.text()
    assert text.startswith("Not adapted") and "no lower label-free score" in text and "nothing was saved" in text
    assert loop.model.value == "default" and recent_models() == [] and not calls[0]["out"].exists()


def test_adapting_shows_the_time_spent_against_the_budget():
    from cellsynth._napari.loop_widget import against_budget
    from cellsynth.progress import Progress

    seen = []
    timed = against_budget(seen.append, 3.0)
    timed(Progress("train", 1, 10, "loss 0.2"))
    timed(Progress("train", 2, 10))
    assert seen[0].message.startswith("loss 0.2 · 0:0") and seen[0].message.endswith(" of 3:00")
    assert seen[1].message.endswith(" of 3:00") and (seen[1].step, seen[1].total) == (2, 10)
    assert against_budget(None, 3.0) is None


def test_retraining_takes_every_image_with_checked_regions_when_asked(open_dock, make_napari_viewer, qtbot,
                                                                     monkeypatch, tiny_model, _data_dir):
    import cellsynth.adapt

    fake, seen = _fake_adapt(tiny_model, []), []

    def fake_retrain(images, points, **kw):
        seen.append((images, points, kw["regions"]))
        return fake(images, **kw)

    monkeypatch.setattr(cellsynth.adapt, "retrain_counter", fake_retrain)
    viewer = make_napari_viewer()
    for name, seed in (("a", 3), ("b", 4), ("c", 5)):
        viewer.add_image(_image(seed), name=name)
    loop = open_dock(viewer, "Counting loop")
    remember_model(tiny_model, kind="adapted", image="a")
    loop.model.value = "classic"
    loop.diameter.value.value = 15.0
    assert _click(qtbot, loop, loop.count_all_button) == "done"  # every image has its points; c gets no regions
    loop.image.value = viewer.layers["b"]
    loop.regions_button.native.click()
    viewer.layers[regions_name("b")].add_rectangles(np.array([[0.0, 0.0], [40.0, 40.0]]))
    loop.image.value = viewer.layers["a"]
    loop.model.reset_choices()
    loop.model.value = str(tiny_model)
    loop.retrain_all.value = True
    assert _click(qtbot, loop, loop.retrain_button) == "done"
    images, points, regions = seen[0]
    assert len(images) == 2 and regions[0] is None and regions[1] == [(0, 0, 40, 40)]
    assert len(points[1]) == len(viewer.layers[result_name("b")].data)
    loop.retrain_all.value = False  # the chosen image only
    loop.model.value = str(tiny_model)
    assert _click(qtbot, loop, loop.retrain_button) == "done"
    assert len(seen[1][0]) == 1 and seen[1][2] is None
