"""The Stylize (InST) widget driven as a person would, on a tiny pipeline folder."""

import numpy as np
import pytest
import torch

from cellsynth._napari.stylize_widget import TOKEN_TRAINED, StylizeWidget, result_name
from cellsynth.stylize import save_token
from cellsynth.stylize.tiny import save_tiny_pipeline, tiny_token


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_pipeline(root / "sd", seed=0), save_token(tiny_token(0), root / "token")


def _widget(viewer, model_dir, token_dir=None):
    content = np.zeros((40, 48), np.uint8)
    content[10:20, 10:22] = 210
    viewer.add_image(content, name="layout", scale=(0.5, 0.5), translate=(3, 4))
    viewer.add_image((np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8), name="real")
    w = StylizeWidget(viewer)
    w.content.value = viewer.layers["layout"]
    w.style.value = viewer.layers["real"]
    w.model.value = str(model_dir)
    w.device.value = "cpu"
    w.form.num_inference_steps.value = 4
    w.form.size.value = 32
    if token_dir is not None:
        w.token_file.value = token_dir / "token.json"
    return w


def _click(qtbot, w, button, timeout=60000):
    with qtbot.waitSignal(w.runner.finished, timeout=timeout) as blocker:
        button.native.click()
    return blocker.args[0]


def test_stylize_adds_then_updates_the_result_layer(make_napari_viewer, qtbot, model):
    viewer = make_napari_viewer()
    w = _widget(viewer, *model)
    assert _click(qtbot, w, w.run_button) == "done", w.runner.status.text()
    layer = viewer.layers[result_name("layout")]
    assert layer.data.shape == (40, 48) and layer.data.dtype == np.uint8
    assert tuple(layer.scale) == (0.5, 0.5) and tuple(layer.translate) == (3, 4)
    meta = layer.metadata["cellsynth"]
    assert meta["operation"] == "stylize.inst" and meta["params"]["num_inference_steps"] == 4
    assert meta["style_layer"] == "real" and meta["t_start"] is not None
    first = layer.data.copy()
    w.form.seed.value = 7
    assert _click(qtbot, w, w.run_button) == "done"
    assert len(viewer.layers) == 3 and viewer.layers[result_name("layout")] is layer
    assert not np.array_equal(layer.data, first) and layer.metadata["cellsynth"]["params"]["seed"] == 7


def test_cancel_leaves_the_viewer_unchanged(make_napari_viewer, qtbot, model):
    viewer = make_napari_viewer()
    w = _widget(viewer, *model)
    w.form.num_inference_steps.value = 500
    w.form.strength.value = 1.0
    with qtbot.waitSignal(w.runner.finished, timeout=60000) as blocker:
        w.run_button.native.click()
        qtbot.waitUntil(lambda: w.runner.bar.value() >= 3, timeout=30000)
        w.runner.cancel_button.click()
    assert blocker.args[0] == "cancelled"
    assert [l.name for l in viewer.layers] == ["layout", "real"]
    # with a result present, a cancelled re-run leaves it as it was
    w.form.num_inference_steps.value, w.form.strength.value = 4, 0.7
    assert _click(qtbot, w, w.run_button) == "done"
    layer = viewer.layers[result_name("layout")]
    data, meta = layer.data.copy(), dict(layer.metadata["cellsynth"])
    w.form.num_inference_steps.value, w.form.strength.value, w.form.seed.value = 500, 1.0, 9
    with qtbot.waitSignal(w.runner.finished, timeout=60000) as blocker:
        w.run_button.native.click()
        qtbot.waitUntil(lambda: w.runner.bar.value() >= 3, timeout=30000)
        w.runner.cancel_button.click()
    assert blocker.args[0] == "cancelled" and len(viewer.layers) == 3
    assert np.array_equal(layer.data, data) and layer.metadata["cellsynth"] == meta


def test_a_failing_run_shows_the_error_and_changes_nothing(make_napari_viewer, qtbot, model, tmp_path):
    viewer = make_napari_viewer()
    w = _widget(viewer, *model)
    w.model.value = str(tmp_path)  # an empty folder: not a Stable Diffusion model
    assert _click(qtbot, w, w.run_button) == "error"
    assert "model_index.json" in w.runner.status.text() and isinstance(w.runner.last_error, ValueError)
    assert [l.name for l in viewer.layers] == ["layout", "real"]


def test_missing_token_is_an_error_and_changes_nothing(make_napari_viewer, qtbot, model):
    viewer = make_napari_viewer()
    w = _widget(viewer, model[0])
    w.run_button.native.click()
    assert "token" in w.runner.status.text() and not w.runner.running
    assert len(viewer.layers) == 2


def test_train_token_from_style_layer_draws_loss_and_is_used(make_napari_viewer, qtbot, model, tmp_path):
    viewer = make_napari_viewer()
    w = _widget(viewer, model[0])
    w.train_form.steps.value = 5
    w.train_form.size.value = 32
    w.token_out.value = tmp_path / "tok"
    assert _click(qtbot, w, w.train_button) == "done", w.runner.status.text()
    assert len(w.loss_curve.losses) == 5 and w.token is not None
    assert w.token_source.value == TOKEN_TRAINED and (tmp_path / "tok" / "token.json").is_file()
    w.preview.value = True
    assert _click(qtbot, w, w.run_button) == "done"
    meta = viewer.layers[result_name("layout")].metadata["cellsynth"]
    assert meta["preview"] is True and meta["token"]["source"] == "trained"


def test_plugin_widget_docks_from_the_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    try:
        dock, widget = viewer.window.add_plugin_dock_widget("napari-cellsynth", "Stylize (InST)")
    except KeyError:
        pytest.skip("napari.yaml does not list the Stylize widget yet")
    assert isinstance(widget, StylizeWidget)


def test_stylize_dataset_from_the_widget(make_napari_viewer, qtbot, model, tmp_path):
    from cellsynth.layouts import LayoutParams, export_dataset, read_dataset

    export_dataset(tmp_path / "lay", 2, params=LayoutParams(shape=(32, 32), count_mean=5, count_std=0, count_min=2,
                                                            count_max=8, cell_size=8.0), seed=0)
    viewer = make_napari_viewer()
    w = _widget(viewer, *model)
    w.form.num_inference_steps.value = 2
    w.batch_in.value = tmp_path / "lay"
    w.batch_out.value = tmp_path / "syn"
    w.qc_model.value = "classic"
    w.tolerance.value = 50.0
    assert _click(qtbot, w, w.batch_button) == "done", w.runner.status.text()
    ds = read_dataset(tmp_path / "syn")
    assert len(ds) == 2 and all(it["qc"]["keep"] for it in ds.items)
    assert "2 kept" in w.batch_label.text()
    assert [l.name for l in viewer.layers] == ["layout", "real"]
