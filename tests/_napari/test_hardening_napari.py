"""The napari side under stress: closing mid-run, names per input, CSV round trips, docks that fit."""

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

napari = pytest.importorskip("napari")
torch = pytest.importorskip("torch")

from cellsynth._napari.count_widget import CountWidget  # noqa: E402
from cellsynth._napari.layouts_widget import LayoutsWidget  # noqa: E402
from cellsynth._napari.loop_widget import LoopWidget  # noqa: E402
from cellsynth._napari.nsc_widget import NSCWidget  # noqa: E402
from cellsynth._napari.stain_widget import StainWidget, stain_layer_name  # noqa: E402
from cellsynth._napari.stylize_widget import StylizeWidget  # noqa: E402

NAPARI_DIR = Path(__file__).resolve().parents[2] / "src" / "cellsynth" / "_napari"
WIDGETS = (CountWidget, StainWidget, NSCWidget, StylizeWidget, LayoutsWidget, LoopWidget)

CLOSE_MID_RUN = textwrap.dedent(
    """
    import time
    import numpy as np
    import napari
    from qtpy.QtCore import QCoreApplication
    from cellsynth._napari.count_widget import CountWidget
    from cellsynth._napari.stain_widget import StainWidget
    from cellsynth.progress import report

    def close_mid_run(widget_class):
        viewer = napari.Viewer(show=True)
        viewer.add_image(np.zeros((16, 16)))
        dock = widget_class(viewer)
        viewer.window.add_dock_widget(dock, name="under test")
        state = {"steps": 0, "ended": None}

        def work(progress):
            try:
                for i in range(3000):
                    time.sleep(0.01)
                    state["steps"] = i
                    report(progress, "steps", i + 1, 3000)
                return "finished"
            finally:
                state["ended"] = time.monotonic()

        dock.runner.start(work, on_done=lambda r: None, label="long")
        while state["steps"] < 20:
            QCoreApplication.processEvents()
        closed = time.monotonic()
        viewer.close()
        deadline = closed + 5
        while state["ended"] is None and time.monotonic() < deadline:
            QCoreApplication.processEvents()
            time.sleep(0.01)
        assert state["ended"] is not None and state["ended"] - closed < 2.0, state
        print(widget_class.__name__, "stopped after", round(state["ended"] - closed, 2), "s")

    close_mid_run(CountWidget)
    close_mid_run(StainWidget)

    # heavy imports after a window exists, as from napari's console or a script (triton next to llvmpipe)
    viewer = napari.Viewer(show=True)
    viewer.add_image(np.zeros((8, 8)))
    import torch, diffusers
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8,), down_block_types=("DownBlock2D",),
                                 up_block_types=("UpBlock2D",), norm_num_groups=4)
    print("unet", tuple(unet(torch.zeros(1, 1, 8, 8), 1).sample.shape))
    viewer.close()
    """
)

needs_display = pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs an X server (pytest-xvfb)")


@needs_display
def test_closing_napari_mid_run_stops_the_work_and_heavy_imports_after_a_window_do_not_crash():
    """One interpreter (napari's start-up is the cost): close two docks mid-run, then import torch/diffusers."""
    res = subprocess.run([sys.executable, "-c", CLOSE_MID_RUN], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "CountWidget stopped after" in res.stdout and "StainWidget stopped after" in res.stdout
    assert "unet (1, 1, 8, 8)" in res.stdout
    assert "has been deleted" not in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]


@pytest.fixture(scope="module")
def tiny_stain_model(tmp_path_factory):
    from cellsynth.stain.model import StainModelConfig, build_unet, save_stain_model

    torch.manual_seed(0)
    cfg = StainModelConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=8, sample_size=16,
                           num_train_timesteps=20, attention_head_dim=4, dropout=0.0,
                           condition_norm={"low": [0.0] * 3, "high": [255.0] * 3, "mean": [0.5] * 3,
                                           "std": [0.3] * 3})
    out = tmp_path_factory.mktemp("stain_model")
    save_stain_model(build_unet(cfg), cfg, out)
    return out


def test_stain_results_are_named_after_their_input(open_dock, make_napari_viewer, qtbot, tiny_stain_model, one_torch_thread):
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    a = viewer.add_image(rng.integers(0, 255, (3, 24, 24)).astype(np.uint8), name="well A", scale=(1, 0.5, 0.5))
    b = viewer.add_image(rng.integers(0, 255, (3, 16, 16)).astype(np.uint8), name="well B", scale=(1, 2.0, 2.0))
    w = open_dock(viewer, "Virtual staining")
    w.model.value = tiny_stain_model
    w.form.steps.value = 2
    w.form.guidance.value = False
    for layer in (a, b):
        w.layer.value = layer
        with qtbot.waitSignal(w.runner.finished, timeout=60000) as blocker:
            w.run_button.native.click()
        assert blocker.args == ["done"], w.runner.last_error
    dna_a, dna_b = viewer.layers[stain_layer_name("DNA", "well A")], viewer.layers[stain_layer_name("DNA", "well B")]
    assert dna_a is not dna_b
    assert dna_a.data.shape == (24, 24) and tuple(dna_a.scale) == (0.5, 0.5)
    assert dna_b.data.shape == (16, 16) and tuple(dna_b.scale) == (2.0, 2.0)
    assert dna_a.metadata["cellsynth"]["source"] == "well A"
    # result layers are not offered as brightfield inputs
    assert [lay.name for lay in w.layer.choices] == ["well A", "well B"]


def test_points_csv_round_trip_keeps_the_world_position(make_napari_viewer, tmp_path):
    from cellsynth._napari.points_io import get_points_reader, write_points

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((40, 60)), scale=(0.5, 0.5), translate=(3.0, -2.0))
    pts = viewer.add_points(np.array([[4.0, 10.0], [30.0, 55.0], [12.5, 7.25]]), scale=(0.5, 0.5),
                            translate=(3.0, -2.0), features={"score": [0.9, 0.5, 1.0]}, name="cells")
    path = tmp_path / "cells.csv"
    write_points(str(path), pts.data, {"features": pts.features, "scale": pts.scale, "translate": pts.translate})
    data, kwargs, kind = get_points_reader(str(path))(str(path))[0]
    assert kind == "points"
    np.testing.assert_allclose(data, pts.data)
    np.testing.assert_allclose(kwargs["scale"], (0.5, 0.5))
    np.testing.assert_allclose(kwargs["translate"], (3.0, -2.0))
    # through napari's own open (as File > Open with this plugin)
    [back] = viewer.open(str(path), plugin="napari-cellsynth")
    world = np.array([back.data_to_world(p) for p in back.data])
    np.testing.assert_allclose(world, [pts.data_to_world(p) for p in pts.data])
    np.testing.assert_allclose(back.features["score"], [0.9, 0.5, 1.0])


def test_a_points_csv_of_one_point_lands_at_its_world_position(tmp_path):
    from cellsynth import io
    from cellsynth._napari.points_io import world_transform

    path = io.write_points_csv(tmp_path / "one.csv", np.array([[8.0, 4.0]]), scale=(0.25, 0.25), translate=(1, 1))
    scale, translate = world_transform(path, np.array([[8.0, 4.0]]))
    np.testing.assert_allclose(np.array([8.0, 4.0]) * scale + translate, [3.0, 2.0])


def test_docks_scroll_instead_of_growing_past_a_1080p_screen(make_napari_viewer):
    from qtpy.QtWidgets import QScrollArea

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32), np.uint8), name="img")
    for cls in WIDGETS:
        w = cls(viewer)
        viewer.window.add_dock_widget(w, name=cls.__name__)
        assert w.findChildren(QScrollArea), f"{cls.__name__} has no scroll area"
        assert w.minimumSizeHint().height() < 700, (cls.__name__, w.minimumSizeHint().height())
        assert w.runner.isVisibleTo(w), f"{cls.__name__}: the task panel must stay in view"


def test_device_menus_offer_only_devices_this_machine_has(make_napari_viewer, monkeypatch):
    from cellsynth import device

    monkeypatch.delitem(sys.modules, "torch")  # as at napari start-up, before any model is loaded
    try:
        choices = device.device_choices()
    finally:
        sys.modules["torch"] = torch
    assert choices[:2] == ["auto", "cpu"]
    assert ("cuda" in choices) == device.nvidia_driver_present()
    assert ("mps" in choices) == (sys.platform == "darwin" and __import__("platform").machine() == "arm64")
    viewer = make_napari_viewer()
    real = set(device.available_devices())
    for cls in (CountWidget, StainWidget, NSCWidget):
        w = cls(viewer)
        assert set(w.device.choices) <= real | {"auto", "cpu"}, (cls.__name__, w.device.choices)


def test_layer_pickers_follow_a_renamed_layer(open_dock, make_napari_viewer):
    viewer = make_napari_viewer()
    layer = viewer.add_image(np.zeros((3, 16, 16), np.uint8), name="before")
    count, stain, nsc = open_dock(viewer, "Count cells"), open_dock(viewer, "Virtual staining"), open_dock(viewer, "NSC masks")
    layer.name = "after"

    def labels(combo):
        return [combo.native.itemText(i) for i in range(combo.native.count())]

    assert labels(count.image) == ["after"]
    assert labels(stain.layer) == ["after"]
    assert "after" in labels(nsc.layer)


def test_no_private_napari_attributes_are_used():
    private = re.compile(r"\.(_type_string|_qt_window|_qt_viewer|qt_viewer|_dock_widgets|_layer_list|_canvas)\b")
    found = [f"{p.name}:{i}" for p in NAPARI_DIR.glob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if private.search(line)]
    assert not found, found


def _sample_nuclei():
    from cellsynth.io import read_tiff

    path = Path(__file__).resolve().parents[2] / "resources" / "samples" / "neurocyte_010.tif"
    return read_tiff(path)[0]


def test_count_progress_is_determinate_and_cancel_acts_within_a_second(open_dock, make_napari_viewer, qtbot, one_torch_thread):
    viewer = make_napari_viewer()
    viewer.add_image(np.tile(_sample_nuclei(), (2, 2)), name="nuclei")
    w = open_dock(viewer, "Count cells")
    events = []
    w.runner._bridge.progress.connect(events.append)
    # let one run reach its tiles: the bar counts tiles
    with qtbot.waitSignal(w.runner.finished, timeout=120000):
        w.run_button.native.click()
        qtbot.waitUntil(lambda: any(e.stage == "tiles" for e in events), timeout=120000)
        tiles = next(e for e in events if e.stage == "tiles")
        qtbot.waitUntil(lambda: w.runner.bar.maximum() == tiles.total, timeout=5000)
        w.runner.cancel_button.click()
    stages = [e.stage for e in events]
    assert stages[0] == "loading the counter" and "estimating the cell diameter" in stages
    assert tiles.total > 1 and all(e.total for e in events)
    assert [lay.name for lay in viewer.layers] == ["nuclei"]
    # cancel inside a long step without progress calls (the diameter estimate) frees the panel at once
    events.clear()
    with qtbot.waitSignal(w.runner.finished, timeout=120000) as blocker:
        w.run_button.native.click()
        qtbot.waitUntil(lambda: any(e.stage == "estimating the cell diameter" for e in events), timeout=120000)
        start = time.monotonic()
        w.runner.cancel_button.click()
    waited = time.monotonic() - start
    assert blocker.args == ["cancelled"] and waited < 1.5, waited
    assert not w.runner.running and w.run_button.enabled
    assert [lay.name for lay in viewer.layers] == ["nuclei"]


def test_a_cancelled_export_says_what_was_written_and_a_rerun_resumes(open_dock, make_napari_viewer, qtbot, tmp_path):
    from cellsynth import io

    viewer = make_napari_viewer()
    w = open_dock(viewer, "Cell layouts")
    w.folder.value = tmp_path / "ds"
    w.n_export.value = 40
    w.form.set_values({"shape": (48, 48)})
    with qtbot.waitSignal(w.runner.finished, timeout=120000) as blocker:
        w.export()
        qtbot.waitUntil(lambda: w.runner.bar.value() >= 3, timeout=60000)
        w.runner.cancel_button.click()
    assert blocker.args == ["cancelled"]
    text = w.runner.status.text()
    done = io.read_json(tmp_path / "ds" / "manifest.json")["items"]
    assert f"{len(done)} of 40 layouts are written" in text and "resume" in text, text
    assert "nothing was changed" not in text
    with qtbot.waitSignal(w.runner.finished, timeout=300000) as blocker:
        w.export()
    assert blocker.args == ["done"]
    assert len(io.read_json(tmp_path / "ds" / "manifest.json")["items"]) == 40



@pytest.mark.parametrize("name", ["Count cells", "Counting loop", "Cell layouts", "Stylize (InST)", "Virtual staining",
                                  "NSC masks"])
def test_no_dock_is_clipped_at_the_default_window_size(open_dock, make_napari_viewer, qtbot, name):
    """At napari's default 1400x900, every control of a dock opened from the Plugins menu fits its width."""
    from qtpy.QtWidgets import QScrollArea

    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1400, 900)
    viewer.add_image(np.zeros((64, 64), np.uint8), name="img")
    w = open_dock(viewer, name)
    qtbot.wait(100)
    scroll = w.findChildren(QScrollArea)[0]
    inner = scroll.widget()
    assert scroll.viewport().width() >= inner.minimumSizeHint().width(), (scroll.viewport().width(),
                                                                           inner.minimumSizeHint().width())
    assert inner.width() <= scroll.viewport().width()
