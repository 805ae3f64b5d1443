"""The "Virtual staining" and "NSC masks" widgets driven as a person would."""

import napari
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from cellsynth._napari.nsc_widget import NSCWidget, mask_layer_name  # noqa: E402
from cellsynth._napari.stain_widget import StainWidget, round_mask_name, stain_layer_name  # noqa: E402
from cellsynth.stain.model import StainModelConfig, build_unet, save_stain_model  # noqa: E402

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    cfg = StainModelConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=8, sample_size=16,
                           num_train_timesteps=20, attention_head_dim=4, dropout=0.0,
                           condition_norm={"low": [0.0] * 3, "high": [255.0] * 3, "mean": [0.5] * 3, "std": [0.3] * 3})
    out = tmp_path_factory.mktemp("model")
    save_stain_model(build_unet(cfg), cfg, out)
    return out


def _click(qtbot, widget, button, timeout=60000):
    with qtbot.waitSignal(widget.runner.finished, timeout=timeout) as blocker:
        button.native.click()
    return blocker.args[0]


def _brightfield(seed=0, shape=(32, 40)):
    return np.random.default_rng(seed).integers(0, 255, (3,) + shape).astype(np.uint8)


def test_stain_adds_one_layer_per_channel_then_updates_in_place(open_dock, make_napari_viewer, qtbot, tiny_model):
    viewer = make_napari_viewer()
    src = viewer.add_image(_brightfield(), name="bf", scale=(1, 0.5, 0.5), translate=(0, 3, 4))
    w = open_dock(viewer, "Virtual staining")
    w.model.value = tiny_model
    w.form.steps.value = 2
    w.form.guidance.value = False
    assert w.layer.value is src
    assert _click(qtbot, w, w.run_button) == "done", w.runner.last_error
    names = [stain_layer_name(c, "bf") for c in CHANNELS]
    assert [l.name for l in viewer.layers] == ["bf"] + names
    dna = viewer.layers[names[0]]
    assert dna.data.shape == (32, 40) and dna.blending == "additive" and dna.colormap.name == "blue"
    assert tuple(dna.scale) == (0.5, 0.5) and tuple(dna.translate) == (3, 4)
    assert all(isinstance(viewer.layers[n], napari.layers.Image) and viewer.layers[n].blending == "additive"
               for n in names)
    assert [viewer.layers[n].colormap.name for n in names] == ["blue", "green", "cyan", "red", "magenta"]
    meta = dna.metadata["cellsynth"]
    assert meta["operation"] == "stain.virtual" and meta["params"]["steps"] == 2 and "sha256" in meta["model"]
    first = dna.data.copy()
    w.form.seed.value = 5
    assert _click(qtbot, w, w.run_button) == "done"
    assert len(viewer.layers) == 6 and viewer.layers[names[0]] is dna
    assert not np.array_equal(dna.data, first) and dna.metadata["cellsynth"]["seed"] == 5


def test_stain_with_guidance_shows_round_masks(open_dock, make_napari_viewer, qtbot, tiny_model):
    viewer = make_napari_viewer()
    viewer.add_image(_brightfield(shape=(24, 24)), name="bf")
    w = open_dock(viewer, "Virtual staining")
    w.model.value = tiny_model
    w.form.steps.value = 2
    w.form.guidance.value = True
    w.form.guidance_strength.value = 0.5
    w.show_masks.value = True
    assert _click(qtbot, w, w.run_button) == "done", w.runner.last_error
    mask = viewer.layers[round_mask_name("DNA", 1, "bf")]
    assert isinstance(mask, napari.layers.Labels) and mask.data.shape == (24, 24)
    assert mask.metadata["cellsynth"]["round"] == 1 and mask.metadata["cellsynth"]["backbone"] == "filters"
    assert set(np.unique(mask.data)) <= {0, 1}
    assert viewer.layers[stain_layer_name("DNA", "bf")].metadata["cellsynth"]["nsc"]["k"] == 5
    assert "mask guidance" in w.info.text()
    # a re-run without masks removes the earlier run's mask layers instead of leaving them stale
    w.show_masks.value = False
    assert _click(qtbot, w, w.run_button) == "done", w.runner.last_error
    assert round_mask_name("DNA", 1, "bf") not in viewer.layers
    assert stain_layer_name("DNA", "bf") in viewer.layers and "bf" in viewer.layers


def test_stain_cancel_leaves_viewer_unchanged(open_dock, make_napari_viewer, qtbot, tiny_model):
    viewer = make_napari_viewer()
    viewer.add_image(_brightfield(shape=(64, 64)), name="bf")
    w = open_dock(viewer, "Virtual staining")
    w.model.value = tiny_model
    w.form.steps.value = 200
    w.form.guidance.value = False
    with qtbot.waitSignal(w.runner.finished, timeout=60000) as blocker:
        w.run_button.native.click()
        qtbot.waitUntil(lambda: w.runner.bar.value() >= 1, timeout=30000)
        w.runner.cancel_button.click()
    assert blocker.args[0] == "cancelled"
    assert [l.name for l in viewer.layers] == ["bf"]


def test_stain_errors_are_shown(open_dock, make_napari_viewer, qtbot, tiny_model):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((2, 16, 16), np.float32), name="two planes")
    w = open_dock(viewer, "Virtual staining")
    w.model.value = tiny_model
    w.form.steps.value = 2
    assert _click(qtbot, w, w.run_button) == "error"
    assert "(3, M, N)" in w.runner.status.text() and len(viewer.layers) == 1


def test_nsc_masks_per_channel_with_provenance(open_dock, make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    stack = np.full((2, 64, 64), 10.0, np.float32)
    stack[0, 10:40, 10:40] = 200
    stack[1, 30:60, 30:60] = 200
    src = viewer.add_image(stack, name="cells", scale=(1, 2, 2), metadata={"planes": ["z-1", "z0"]})
    w = open_dock(viewer, "NSC masks")
    w.form.k.value, w.form.r.value, w.form.fov.value = 2, 1, 64
    assert w.layer.value is src
    assert _click(qtbot, w, w.run_button) == "done", w.runner.last_error
    m0, m1 = viewer.layers[mask_layer_name("cells", 0)], viewer.layers[mask_layer_name("cells", 1)]
    assert isinstance(m0, napari.layers.Labels) and isinstance(m1, napari.layers.Labels)
    assert m0.data[20, 20] == 1 and m0.data[50, 50] == 0 and m1.data[50, 50] == 1 and m1.data[20, 20] == 0
    assert tuple(m0.scale) == (2, 2)
    assert m0.metadata["cellsynth"]["backbone"] == "filters" and "filters" in w.info.text()
    # the dock says which plane each mask comes from
    assert "[0] from plane 0 (z-1), [1] from plane 1 (z0)" in w.info.text() and m1.metadata["cellsynth"]["plane"] == 1
    # one channel only, re-run updates in place
    w.channel.value = 1
    assert _click(qtbot, w, w.run_button) == "done"
    assert viewer.layers[mask_layer_name("cells", 1)] is m1 and len(viewer.layers) == 3


def test_nsc_cancel_leaves_viewer_unchanged(open_dock, make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    img = np.random.default_rng(0).random((768, 768)).astype(np.float32)  # 49 fields of view
    viewer.add_image(img, name="img")
    w = open_dock(viewer, "NSC masks")
    with qtbot.waitSignal(w.runner.finished, timeout=60000) as blocker:
        w.run_button.native.click()
        qtbot.waitUntil(lambda: w.runner.bar.value() >= 1, timeout=30000)
        w.runner.cancel_button.click()
    assert blocker.args[0] == "cancelled"
    assert [l.name for l in viewer.layers] == ["img"]


def test_nsc_channel_box_only_for_layers_with_channels(open_dock, make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32), np.float32), name="gray")
    w = open_dock(viewer, "NSC masks")
    hidden = w.channel.native.isHidden  # the dock itself is not shown here
    assert w.layer.value.name == "gray" and hidden()
    viewer.add_image(np.zeros((3, 32, 32), np.float32), name="stack")
    w.layer.value = viewer.layers["stack"]
    assert not hidden()
    viewer.add_image(np.zeros((32, 32, 3), np.uint8), name="rgb", rgb=True)
    w.layer.value = viewer.layers["rgb"]
    assert hidden()


def test_nsc_bad_parameters_and_channel(open_dock, make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32), np.float32), name="img")
    w = open_dock(viewer, "NSC masks")
    w.form.input_size.value = 100  # not a multiple of the patch size
    w.run_button.native.click()
    assert "multiple of patch" in w.runner.status.text() and len(viewer.layers) == 1
    viewer.add_image(np.zeros((2, 32, 32), np.float32), name="stack")
    w2 = NSCWidget(viewer)
    w2.layer.value = viewer.layers["stack"]
    w2.channel.value = 4
    w2.run_button.native.click()
    assert "channel 4" in w2.runner.status.text() and len(viewer.layers) == 2


def test_train_from_the_widget_then_stain_with_it(open_dock, make_napari_viewer, qtbot, tmp_path):
    from cellsynth.stain.simulate import simulate_stain_pairs

    data = simulate_stain_pairs(tmp_path / "pairs", 2, shape=(32, 32))
    viewer = make_napari_viewer()
    viewer.add_image(_brightfield(shape=(32, 32)), name="bf")
    w = open_dock(viewer, "Virtual staining")
    w.train_data.value, w.train_out.value = data, tmp_path / "model"
    w.train_epochs.value, w.train_crop.value = 1, 16
    # the Train button itself (one step per epoch: 2 fields of view fit in one batch)
    assert _click(qtbot, w, w.train_button, timeout=120000) == "done", w.runner.last_error
    assert (tmp_path / "model" / "model.safetensors").is_file() and w.model_path() == str(tmp_path / "model")
    assert "Trained 1 steps" in w.info.text()


def _saturation(rgba) -> float:
    rgb = rgba[..., :3].astype(float) / 255
    top = rgb.max(-1)
    return float(np.mean(np.where(top > 0, (top - rgb.min(-1)) / np.maximum(top, 1e-6), 0.0)))


def test_stained_channels_read_clearly_over_the_brightfield(open_dock, make_napari_viewer, qtbot, tiny_model):
    """Channels get robust contrast limits and the brightfield is dimmed, not left to wash the colours out."""
    from cellsynth._napari.stain_widget import BRIGHTFIELD_OPACITY, CHANNEL_PERCENTILES

    viewer = make_napari_viewer(show=True)
    bf = viewer.add_image(_brightfield(shape=(48, 48)) // 2 + 120, name="bf")  # a grey brightfield, as a camera gives
    w = open_dock(viewer, "Virtual staining")
    w.model.value = tiny_model
    w.form.steps.value = 2
    w.form.guidance.value = False
    assert _click(qtbot, w, w.run_button) == "done", w.runner.last_error
    channels = [viewer.layers[stain_layer_name(c, "bf")] for c in CHANNELS]
    for lay in channels:
        assert np.allclose(lay.contrast_limits, np.percentile(lay.data, CHANNEL_PERCENTILES), rtol=1e-5)
    assert bf.visible and bf.opacity == BRIGHTFIELD_OPACITY and "opacity" in w.info.text()
    qtbot.wait(50)
    shown = viewer.screenshot(canvas_only=True, flash=False)
    # baseline: the full brightfield under channels spanning 0..1 (how they were shown before)
    bf.opacity = 1.0
    for lay in channels:
        lay.contrast_limits = (0.0, 1.0)
    qtbot.wait(50)
    baseline = viewer.screenshot(canvas_only=True, flash=False)
    assert _saturation(shown) > _saturation(baseline) + 0.1, (_saturation(shown), _saturation(baseline))
    # a re-run leaves the brightfield as the user set it and gives the new data its own limits
    bf.opacity = 0.8
    w.form.seed.value = 3
    assert _click(qtbot, w, w.run_button) == "done"
    assert bf.opacity == 0.8 and "opacity" not in w.info.text()
    assert np.allclose(channels[0].contrast_limits, np.percentile(channels[0].data, CHANNEL_PERCENTILES), rtol=1e-5)


def test_input_pixels_are_read_in_the_worker_not_the_window(open_dock, make_napari_viewer, qtbot, tiny_model):
    """A lazy (dask) input is computed by the worker; clicking Stain or Compute masks reads no pixels.

    dask's synchronous scheduler computes blocks in the thread that asks for them.
    """
    import threading

    da = pytest.importorskip("dask.array")
    on_gui = []

    def record(block):
        on_gui.append(threading.current_thread() is threading.main_thread())
        return block

    viewer = make_napari_viewer()
    bf = _brightfield(shape=(32, 32))
    viewer.add_image(da.from_array(bf, chunks=bf.shape).map_blocks(record, dtype=bf.dtype), name="bf")
    stain, nsc = open_dock(viewer, "Virtual staining"), open_dock(viewer, "NSC masks")
    stain.model.value = tiny_model
    stain.form.steps.value = 2
    stain.form.guidance.value = False
    nsc.form.k.value, nsc.form.r.value, nsc.form.fov.value = 2, 1, 32
    dask = pytest.importorskip("dask")
    for widget, button in ((stain, stain.run_button), (nsc, nsc.run_button)):
        finished = qtbot.waitSignal(widget.runner.finished, timeout=60000)
        with dask.config.set(scheduler="synchronous"), finished as blocker:
            on_gui.clear()
            button.native.click()
            read_by_click = list(on_gui)
        assert blocker.args[0] == "done", widget.runner.last_error
        assert True not in read_by_click and False in on_gui, on_gui  # read by the worker, not by the click


def test_the_brightfield_box_starts_on_a_focus_stack_among_other_images(open_dock, make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32), np.uint8), name="nuclei")
    viewer.add_image(np.zeros((32, 32, 3), np.uint8), name="colour", rgb=True)
    viewer.add_image(np.zeros((3, 32, 32), np.uint16), name="focus stack")
    w = open_dock(viewer, "Virtual staining")
    assert w.layer.value.name == "focus stack"


def test_the_dock_starts_with_the_presets_sampling_values(open_dock, make_napari_viewer):
    from cellsynth.stain.params import stain_preset

    w = open_dock(make_napari_viewer(), "Virtual staining")
    want, _ = stain_preset(w.preset.value)
    assert w.form.params(scheduler=w.scheduler.value) == want
