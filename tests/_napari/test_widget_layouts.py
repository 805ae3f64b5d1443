"""The Cell layouts widget driven as a person would."""

import numpy as np
import pytest

from cellsynth import io
from cellsynth._napari.layouts_widget import CENTRES, IMAGE, LABELS, LayoutsWidget


def _small(widget, shape=(64, 80)):
    widget.form.shape.value = shape
    widget.form.count_mean.value = 15
    widget.form.count_std.value = 0


def _click(qtbot, widget, button):
    with qtbot.waitSignal(widget.runner.finished, timeout=30000) as blocker:
        button.native.click()
    return blocker.args[0]


def test_generate_adds_then_updates_three_layers(open_dock, make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    w = open_dock(viewer, "Cell layouts")
    _small(w)
    w.seed.value = 4
    assert _click(qtbot, w, w.generate_button) == "done"
    assert [l.name for l in viewer.layers] == [IMAGE, LABELS, CENTRES]
    img, lab, pts = (viewer.layers[n] for n in (IMAGE, LABELS, CENTRES))
    assert img.data.shape == (64, 80) and img.data.dtype == np.uint8
    n = int(lab.data.max())
    assert len(pts.data) == n and list(pts.features.columns) == ["radius_row", "radius_col", "angle", "intensity"]
    assert w.count_label.text() == f"Cells: {n}"
    meta = img.metadata["cellsynth"]
    assert meta["operation"] == "layouts.generate" and meta["seed"] == 4 and meta["n_cells"] == n
    first = img.data.copy()
    # Next seed re-uses the same layers
    assert _click(qtbot, w, w.next_button) == "done"
    assert len(viewer.layers) == 3 and w.seed.value == 5
    assert viewer.layers[IMAGE] is img and not np.array_equal(img.data, first)
    assert viewer.layers[IMAGE].metadata["cellsynth"]["seed"] == 5


def test_parameters_persist_between_sessions(open_dock, make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    w = open_dock(viewer, "Cell layouts")
    _small(w, (48, 48))
    w.form.cell_size.value = 9.0
    _click(qtbot, w, w.generate_button)
    w2 = LayoutsWidget(viewer)
    assert w2.form.cell_size.value == 9.0 and tuple(w2.form.shape.value) == (48, 48)


def test_bad_parameters_show_an_error_and_change_nothing(open_dock, make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    w = open_dock(viewer, "Cell layouts")
    w.form.count_min.value = 500
    w.form.count_max.value = 10
    w.generate_button.native.click()
    assert "count_min" in w.runner.status.text()
    assert len(viewer.layers) == 0 and not w.runner.running


def test_draw_mode_edits_rerender_image_and_labels(open_dock, make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    w = open_dock(viewer, "Cell layouts")
    _small(w)
    w.draw.value = True  # no layout yet: an empty canvas to draw on
    pts = viewer.layers[CENTRES]
    assert pts.mode == "add" and len(pts.data) == 0
    assert viewer.layers[LABELS].data.max() == 0
    pts.add([[20.0, 30.0]])
    pts.add([[45.0, 60.0]])
    qtbot.waitUntil(lambda: viewer.layers[LABELS].data.max() == 2, timeout=5000)
    labels = viewer.layers[LABELS].data
    assert labels[20, 30] == 1 and labels[45, 60] == 2
    assert viewer.layers[IMAGE].data[20, 30] > viewer.layers[IMAGE].data[2, 2] + 50
    assert w.count_label.text() == "Cells: 2"
    # move the first cell, then delete the second
    pts.data = np.array([[30.0, 10.0], [45.0, 60.0]])
    qtbot.waitUntil(lambda: viewer.layers[LABELS].data[30, 10] == 1, timeout=5000)
    assert viewer.layers[LABELS].data[20, 30] == 0
    pts.selected_data = {1}
    pts.remove_selected()
    qtbot.waitUntil(lambda: viewer.layers[LABELS].data.max() == 1, timeout=5000)
    assert w.count_label.text() == "Cells: 1"
    assert viewer.layers[IMAGE].metadata["cellsynth"]["operation"] == "layouts.draw"


def test_export_with_progress_then_cancel_and_resume(open_dock, make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    w = open_dock(viewer, "Cell layouts")
    _small(w, (40, 40))
    w.folder.value = tmp_path / "ds"
    w.n_export.value = 6
    assert _click(qtbot, w, w.export_button) == "done"
    doc = io.read_json(tmp_path / "ds" / "manifest.json")
    assert doc["complete"] and len(doc["items"]) == 6
    assert w.runner.bar.value() == w.runner.bar.maximum()
    assert len(viewer.layers) == 0  # exporting adds no layers

    # a long export cancelled part-way leaves a resumable folder and an unchanged viewer
    w.folder.value = tmp_path / "big"
    w.n_export.value = 400
    with qtbot.waitSignal(w.runner.finished, timeout=60000) as blocker:
        w.export_button.native.click()
        qtbot.waitUntil(lambda: w.runner.bar.value() >= 2, timeout=30000)
        w.runner.cancel_button.click()
    assert blocker.args[0] == "cancelled"
    assert "Cancelled" in w.runner.status.text()
    done = len(io.read_json(tmp_path / "big" / "manifest.json")["items"])
    assert 2 <= done < 400
    assert len(viewer.layers) == 0


def test_export_into_a_foreign_folder_is_refused(open_dock, make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    w = open_dock(viewer, "Cell layouts")
    _small(w, (40, 40))
    (tmp_path / "notes.txt").write_text("mine")
    w.folder.value = tmp_path
    assert _click(qtbot, w, w.export_button) == "error"
    assert "not empty" in w.runner.status.text()
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_sample_data_contribution(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-cellsynth", "layout")
    assert [l.name for l in viewer.layers] == [IMAGE, LABELS, CENTRES]
    assert len(viewer.layers[CENTRES].data) == viewer.layers[LABELS].data.max() > 0


def test_plugin_widget_docks_from_the_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    dock, widget = viewer.window.add_plugin_dock_widget("napari-cellsynth", "Cell layouts")
    assert isinstance(widget, LayoutsWidget)


def test_draw_mode_ellipses_become_cells_with_their_shape(open_dock, make_napari_viewer, qtbot):
    from cellsynth._napari.layouts_widget import ELLIPSES

    viewer = make_napari_viewer()
    w = open_dock(viewer, "Cell layouts")
    _small(w, (64, 80))
    w.draw.value = True
    shapes = viewer.layers[ELLIPSES]
    shapes.add_ellipses(np.array([[30.0, 40.0], [6.0, 12.0]]))  # centre, radii (rows, cols)
    qtbot.waitUntil(lambda: viewer.layers[LABELS].data.max() == 1, timeout=5000)
    labels = viewer.layers[LABELS].data
    area = np.count_nonzero(labels == 1)
    assert labels[30, 40] == 1 and abs(area - np.pi * 6 * 12) < 0.1 * np.pi * 6 * 12
    rows, cols = np.nonzero(labels == 1)
    assert np.ptp(cols) > np.ptp(rows) + 8  # wide, as drawn
    assert labels[30, 52 - 2] == 1 and labels[30 + 6 + 2, 40] == 0
    # replace it by the same ellipse turned 45 degrees (corners of its rotated bounding box)
    c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
    offsets = np.array([[-6, -12], [-6, 12], [6, 12], [6, -12]], dtype=float)
    turned = np.array([30.0, 40.0]) + offsets @ np.array([[c, s], [-s, c]])
    shapes.selected_data = {0}
    shapes.remove_selected()
    shapes.add_ellipses(turned)
    qtbot.waitUntil(lambda: viewer.layers[LABELS].data.max() == 1 and
                    viewer.layers[LABELS].data[30 - 6, 40 + 6] == 1, timeout=5000)
    rows, cols = np.nonzero(viewer.layers[LABELS].data == 1)
    cov = np.cov(np.stack([rows, cols]))
    major = np.linalg.eigh(cov)[1][:, -1]
    assert abs(abs(major[0]) - abs(major[1])) < 0.15 and major[0] * major[1] < 0  # along the anti-diagonal
    assert w.count_label.text() == "Cells: 1"


def test_draw_mode_keeps_the_look_of_the_shown_layout(open_dock, make_napari_viewer, qtbot):
    """Adding a cell by hand changes that cell's pixels only: noise, background and contrast stay."""
    viewer = make_napari_viewer()
    w = open_dock(viewer, "Cell layouts")
    _small(w, (64, 80))
    w.form.count_mean.value = 4
    w.seed.value = 7
    assert _click(qtbot, w, w.generate_button) == "done"
    before = viewer.layers[IMAGE].data.copy()
    n = int(viewer.layers[LABELS].data.max())
    w.draw.value = True
    viewer.layers[CENTRES].add([[50.0, 70.0]])
    qtbot.waitUntil(lambda: viewer.layers[LABELS].data.max() == n + 1, timeout=5000)
    after, labels = viewer.layers[IMAGE].data, viewer.layers[LABELS].data
    changed = after != before
    assert changed.any() and np.all(labels[changed] == n + 1), (np.count_nonzero(changed), np.count_nonzero(labels == n + 1))
    # a second cell: again only its own pixels change
    step = after.copy()
    viewer.layers[CENTRES].add([[10.0, 8.0]])
    qtbot.waitUntil(lambda: viewer.layers[LABELS].data.max() == n + 2, timeout=5000)
    changed = viewer.layers[IMAGE].data != step
    assert changed.any() and np.all(viewer.layers[LABELS].data[changed] == n + 2)
    assert viewer.layers[IMAGE].metadata["cellsynth"]["seed"] == 7


def test_add_drawn_layouts_to_a_dataset(open_dock, make_napari_viewer, qtbot, tmp_path):
    from cellsynth.layouts import export_dataset, read_dataset

    viewer = make_napari_viewer()
    w = open_dock(viewer, "Cell layouts")
    _small(w, (48, 56))
    w.folder.value = tmp_path / "drawn"
    w.add_button.native.click()  # nothing shown yet
    assert not (tmp_path / "drawn").exists() and not w.runner.running
    w.draw.value = True
    viewer.layers[CENTRES].add([[20.0, 30.0]])
    viewer.layers[CENTRES].add([[35.0, 10.0]])
    # added straight away: the pending (debounced) edit is rendered first
    assert _click(qtbot, w, w.add_button) == "done", w.runner.last_error
    ds = read_dataset(tmp_path / "drawn")
    assert len(ds) == 1 and ds.manifest["drawn"] and ds.items[0]["n_cells"] == 2
    image, centres, labels = ds.load(0)
    assert np.array_equal(image, viewer.layers[IMAGE].data) and np.array_equal(labels, viewer.layers[LABELS].data)
    assert np.allclose(centres, [[20, 30], [35, 10]])
    first = (tmp_path / "drawn" / ds.items[0]["image"]).read_bytes()
    # a second drawing becomes item 2; item 1 is kept as it was
    viewer.layers[CENTRES].add([[40.0, 40.0]])
    qtbot.waitUntil(lambda: viewer.layers[LABELS].data.max() == 3, timeout=5000)
    assert _click(qtbot, w, w.add_button) == "done"
    ds = read_dataset(tmp_path / "drawn")
    assert ds.counts().tolist() == [2, 3] and "layout 2 of" in w.count_label.text()
    assert (tmp_path / "drawn" / ds.items[0]["image"]).read_bytes() == first
    # a generated dataset is not replaced unless replacing is allowed
    export_dataset(tmp_path / "gen", 2, params=w.form.params(), seed=1)
    manifest = (tmp_path / "gen" / "manifest.json").read_bytes()
    w.folder.value = tmp_path / "gen"
    assert _click(qtbot, w, w.add_button) == "error"
    assert "generated layout dataset" in w.runner.status.text()
    assert (tmp_path / "gen" / "manifest.json").read_bytes() == manifest
    w.overwrite.value = True
    assert _click(qtbot, w, w.add_button) == "done"
    ds = read_dataset(tmp_path / "gen")
    assert ds.counts().tolist() == [3] and not (tmp_path / "gen" / "images" / "layout_0001.tif").exists()
