"""Sample data for every widget: File > Open Sample > CellSynth lists one for each widget, the stored
files are small and reproducible, and the widgets run on their samples."""

import numpy as np
import pytest

from cellsynth._napari.sample import (SAMPLES, STYLE_FILE, make_samples,
                                      sample_brightfield, sample_nuclei, sample_stylize)
from cellsynth.weights import resources_dir

PLUGIN = "napari-cellsynth"
WIDGETS = {"Cell layouts", "Count cells", "Counting loop", "Stylize (InST)", "Virtual staining", "NSC masks"}


def test_open_sample_lists_a_sample_for_every_widget():
    from npe2 import PluginManifest

    mf = PluginManifest.from_distribution(PLUGIN)
    keys = {s.key for s in mf.contributions.sample_data}
    assert keys == set(SAMPLES)
    assert {w.display_name for w in mf.contributions.widgets} == WIDGETS
    assert set().union(*SAMPLES.values()) == WIDGETS  # every widget has a sample
    for s in mf.contributions.sample_data:  # the menu entry says which widgets it is for
        assert all(w in s.display_name for w in SAMPLES[s.key]) or s.key in ("layout", "nuclei")


def test_stored_samples_are_small_and_reproducible(tmp_path):
    folder = resources_dir() / "samples"
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert all(size < 300_000 for size in sizes.values()), sizes
    assert sum(sizes.values()) < 600_000
    written = make_samples(tmp_path)
    import tifffile

    for p in written:  # the generator writes the shipped files (the simulator follows the layout generator)
        new, shipped = tifffile.imread(p), tifffile.imread(folder / p.name)
        assert new.shape == shipped.shape and new.dtype == shipped.dtype, p.name
    style = written[-1]
    assert style.name == STYLE_FILE and np.array_equal(tifffile.imread(style), tifffile.imread(folder / STYLE_FILE))
    with pytest.raises(FileExistsError):
        make_samples(tmp_path)


def test_samples_hold_what_their_widgets_need():
    (nuclei, kw, kind), = sample_nuclei()
    assert kind == "image" and nuclei.shape == (383, 512) and nuclei.dtype == np.uint8
    layers = sample_brightfield()
    bf = layers[0][0]
    assert bf.shape == (3, 128, 128) and bf.dtype == np.uint16  # three focus planes
    truth = {kw["name"]: data for data, kw, _ in layers[1:]}
    assert list(truth) == [f"{c} (simulated truth)" for c in ("DNA", "ER", "RNA", "AGP", "Mito")]
    assert all(not kw["visible"] for _, kw, _ in layers[1:])
    dna = truth["DNA (simulated truth)"].astype(float)
    assert dna.std() > 0 and bf.std() > 0
    (content, ckw, _), (style, skw, _) = sample_stylize()
    assert content.shape == style.shape == (256, 256)
    assert ckw["name"] == "content (layout)" and skw["name"] == "style (real nuclei)"
    big = np.asarray(nuclei)[64:320, 128:384]
    assert np.array_equal(style, big)  # the style image is the documented crop of the real image
    assert (style > np.percentile(style, 50) + 20).mean() > 0.05  # it shows nuclei, not background


@pytest.mark.slow  # the shipped counter and staining model, real weights, on every sample
@pytest.mark.usefixtures("one_torch_thread")
def test_each_widget_runs_on_its_sample(open_dock, make_napari_viewer, qtbot):
    """Count cells, Virtual staining and NSC masks run on their samples; the loop and Stylize pick theirs up."""
    from cellsynth._napari.count_widget import CountWidget, result_name
    from cellsynth._napari.loop_widget import LoopWidget
    from cellsynth._napari.nsc_widget import NSCWidget, mask_layer_name
    from cellsynth._napari.stain_widget import StainWidget, stain_layer_name
    from cellsynth._napari.stylize_widget import StylizeWidget

    viewer = make_napari_viewer()
    for key in SAMPLES:
        viewer.open_sample(PLUGIN, key)
    names = [layer.name for layer in viewer.layers]
    assert {"layout", "neurocyte_010", "brightfield (simulated)", "content (layout)", "style (real nuclei)"} <= set(names)

    def run(w, timeout=180000):
        with qtbot.waitSignal(w.runner.finished, timeout=timeout) as blocker:
            w.run_button.native.click()
        assert blocker.args[0] == "done", w.runner.last_error

    count = open_dock(viewer, "Count cells")
    count.image.value = viewer.layers["neurocyte_010"]
    run(count)
    n = len(viewer.layers[result_name("neurocyte_010")].data)
    assert 55 <= n <= 75  # 65 nuclei annotated in this image

    bf = viewer.layers["brightfield (simulated)"]
    stain = open_dock(viewer, "Virtual staining")
    stain.layer.value = bf
    stain.form.steps.value = 4
    stain.form.guidance.value = False
    run(stain)
    virtual = np.asarray(viewer.layers[stain_layer_name("DNA", bf.name)].data, float)
    truth = np.asarray(viewer.layers["DNA (simulated truth)"].data, float)
    pcc = np.corrcoef(virtual.ravel(), truth.ravel())[0, 1]
    baseline = max(abs(np.corrcoef(p.astype(float).ravel(), truth.ravel())[0, 1]) for p in bf.data)
    assert pcc > baseline + 0.2, (pcc, baseline)  # the stain says more about DNA than any brightfield plane

    nsc = open_dock(viewer, "NSC masks")
    nsc.layer.value = bf
    nsc.channel.value = 1  # the in-focus plane
    run(nsc)
    mask = np.asarray(viewer.layers[mask_layer_name(bf.name, 1)].data) > 0
    assert 0.02 < mask.mean() < 0.98
    cells = truth > np.percentile(truth, 70)  # nuclei of the simulated truth
    enrichment = abs(mask[cells].mean() - mask[~cells].mean())  # the masks follow structure, not noise
    assert enrichment > 0.1, enrichment

    loop = open_dock(viewer, "Counting loop")
    loop.image.value = viewer.layers["neurocyte_010"]
    style = open_dock(viewer, "Stylize (InST)")
    style.content.value = viewer.layers["content (layout)"]
    style.style.value = viewer.layers["style (real nuclei)"]
    assert loop.image.value.name == "neurocyte_010" and style.style.value.name == "style (real nuclei)"
