"""The Count cells widget driven as a person would, and the points CSV reader/writer."""

import numpy as np
import pytest

from cellsynth._napari.count_widget import CountWidget, result_name
from cellsynth._napari.points_io import get_points_reader, write_points
from cellsynth.layouts import LayoutParams, generate_layout


def _layout():
    return generate_layout(LayoutParams(shape=(96, 128), count_mean=25, count_std=0, max_overlap=0.0,
                                        noise_std=2.0), rng=3)


def _run(qtbot, w):
    with qtbot.waitSignal(w.runner.finished, timeout=120000) as blocker:
        w.run_button.native.click()
    return blocker.args[0]


def test_classic_count_gives_points_and_clicks_change_the_count(open_dock, make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    lay = _layout()
    img = viewer.add_image(lay.image, name="nuclei", scale=(0.5, 0.5), translate=(3.0, 4.0))
    w = open_dock(viewer, "Count cells")
    assert w.image.value is img
    w.model.value = "classic"
    w.diameter.value.value = 15.0  # typing a diameter turns the estimate off
    assert w.diameter.auto.value is False and w.diameter.arg() == 15.0
    assert _run(qtbot, w) == "done"
    pts = viewer.layers[result_name("nuclei")]
    n = len(pts.data)
    assert abs(n - lay.n_cells) <= max(2, 0.15 * lay.n_cells)
    assert set(pts.features["source"]) == {"model"} and np.all(np.isfinite(pts.features["score"]))
    assert tuple(pts.scale) == (0.5, 0.5) and tuple(pts.translate) == (3.0, 4.0)
    assert w.count_label.text().startswith(f"Count: {n} ")
    assert "diameter 15.0 px (given)" in w.count_label.text()
    assert pts.metadata["cellsynth"]["operation"] == "count" and pts.metadata["count"] == n
    assert np.allclose(pts.size, 15.0)  # rings as wide as the diameter used
    # a click adds a manual cell, deleting selected points removes them: the count follows at once
    rows, cols = lay.image.shape
    grid = np.array([[r, c] for r in range(2, rows, 3) for c in range(2, cols, 3)], float)
    far = grid[np.argmax(np.linalg.norm(grid[:, None] - pts.data[None], axis=2).min(axis=1))]  # no cell there
    pts.add([far])
    assert pts.features["source"].iloc[-1] == "manual"
    assert _first(w) == f"Count: {n + 1} ({n} from the model, 1 added by hand)"
    deleted = pts.data[[0, 1]].copy()
    pts.selected_data = {0, 1}
    pts.remove_selected()
    assert _first(w) == f"Count: {n - 1} ({n - 2} from the model, 1 added by hand)"
    assert pts.metadata["count"] == n - 1
    # re-running updates the same layer, keeps the point added by hand, does not bring back the deleted ones
    assert _run(qtbot, w) == "done"
    assert [l.name for l in viewer.layers] == ["nuclei", result_name("nuclei")]
    assert viewer.layers[result_name("nuclei")] is pts and len(pts.data) == n - 1
    assert _first(w) == f"Count: {n - 1} ({n - 2} from the model, 1 added by hand)"
    assert "kept 1 points you added" in w.count_label.text() and "left out 2 you had deleted" in w.count_label.text()
    assert far.tolist() in pts.data.tolist()
    for p in deleted:
        assert np.min(np.linalg.norm(pts.data - p, axis=1)) > 1.0


def _first(w):
    return w.count_label.text().splitlines()[0]


def test_default_diameter_is_estimated_and_shown(open_dock, make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(_layout().image, name="nuclei")
    w = open_dock(viewer, "Count cells")
    assert w.diameter.auto.value is True and w.diameter.arg() == "auto"
    assert w.diameter.value.native.text() == "auto"
    w.model.value = "classic"
    assert _run(qtbot, w) == "done"
    pts = viewer.layers[result_name("nuclei")]
    used = pts.metadata["diameter_used"]
    assert pts.metadata["diameter_source"] == "estimated" and 9.0 <= used <= 22.0
    assert f"diameter {used:.1f} px (estimated)" in w.count_label.text()
    assert w.diameter.value.value == round(used, 1) and w.diameter.auto.value is True  # shown, still automatic
    assert np.allclose(pts.size, used)
    assert "found by the model" in w.legend.text() and "added by you" in w.legend.text()


def test_channel_box_only_for_rgb_images(open_dock, make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(_layout().image, name="gray")
    rgb = np.repeat(_layout().image[..., None], 3, axis=2)
    viewer.add_image(rgb, name="colour", rgb=True)
    w = open_dock(viewer, "Count cells")
    w.image.value = viewer.layers["colour"]
    assert w.channel.native.isVisibleTo(w) and w.channel.max == 2
    w.image.value = viewer.layers["gray"]
    assert not w.channel.native.isVisibleTo(w)


def test_score_threshold_hides_low_points_and_the_count_follows(open_dock, make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(_layout().image, name="nuclei")
    w = open_dock(viewer, "Count cells")
    w.model.value = "classic"
    w.diameter.value.value = 15.0
    assert _run(qtbot, w) == "done"
    pts = viewer.layers[result_name("nuclei")]
    scores = pts.features["score"].to_numpy()
    n = len(scores)
    assert w.threshold.max >= scores.max() and np.unique(scores).size > 3
    pts.add([[5.0, 5.0]])  # a point added by hand stays whatever the threshold
    t = float(np.median(scores))
    w.threshold.value = t
    above = int(np.count_nonzero(scores >= w.threshold.value))
    assert 0 < above < n
    assert len(pts.data) == above + 1 and pts.metadata["count"] == above + 1
    assert np.all(pts.features["score"][pts.features["source"] == "model"] >= w.threshold.value)
    assert _first(w) == f"Count: {above + 1} ({above} from the model, 1 added by hand)"
    assert f"{n - above} below score" in w.count_label.text()
    # deleting a shown point by hand, then lowering the threshold: everything else comes back, not that one
    pts.selected_data = {0}
    pts.remove_selected()
    w.threshold.value = 0.0
    assert len(pts.data) == n and pts.metadata["count"] == n
    assert (pts.features["source"] == "manual").sum() == 1


def test_bad_model_file_reports_an_error_and_adds_nothing(open_dock, make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    viewer.add_image(_layout().image, name="nuclei")
    w = open_dock(viewer, "Count cells")
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not weights")
    w.model.value = "file"
    w.model_file.value = bad
    assert _run(qtbot, w) == "error"
    assert w.runner.last_error is not None and "model.safetensors" in str(w.runner.last_error)
    assert len(viewer.layers) == 1


def test_estimate_diameter_fills_the_field(open_dock, make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(_layout().image, name="nuclei")
    w = open_dock(viewer, "Count cells")
    with qtbot.waitSignal(w.runner.finished, timeout=60000):
        w.estimate_button.native.click()
    assert 9.0 <= w.diameter.value.value <= 22.0  # cells of the layout are ~15 px across
    assert w.diameter.auto.value is True  # shown; counting still estimates until a diameter is typed


def test_points_csv_writer_and_reader_round_trip(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    pts = viewer.add_points(np.array([[1.0, 2.0], [3.5, 4.5]]), name="cells", scale=(2.0, 2.0),
                            features={"score": [0.5, 1.0], "source": ["model", "manual"]})
    path = tmp_path / "cells.csv"
    viewer.layers.save(str(path), selected=False, plugin="napari-cellsynth")
    text = path.read_text().splitlines()
    assert text[0] == "row,col,row_world,col_world,axis-0,axis-1,score,source"
    assert text[2].split(",")[2:4] == ["7.0", "9.0"]
    reader = get_points_reader(str(path))
    assert reader is not None and get_points_reader(str(tmp_path / "other.txt")) is None
    viewer.open(str(path), plugin="napari-cellsynth")
    back = viewer.layers[-1]
    np.testing.assert_allclose(back.data, pts.data)
    assert back.features["source"].tolist() == ["model", "manual"]
    np.testing.assert_allclose(back.features["score"], [0.5, 1.0])
    assert np.all(back.face_color[:, 3] == 0)  # rings that leave the nuclei visible, coloured by source
    np.testing.assert_allclose(back.border_color[:, :3], [[1, 1, 0], [0, 1, 1]])
    assert write_points(str(tmp_path / "d.csv"), pts.data, {"features": pts.features}) == [str(tmp_path / "d.csv")]
    # a script's viewer.open(path) uses napari's built-in reader: the points land where they were saved
    plain = viewer.open(str(path))[0]
    np.testing.assert_allclose([plain.data_to_world(p) for p in plain.data], [pts.data_to_world(p) for p in pts.data])
    assert plain.features["source"].tolist() == ["model", "manual"]
    assert np.allclose(plain.face_color, 1.0)  # napari's reader draws filled white discs over the nuclei
    plain.name = "nuclei cells"
    viewer.add_image(np.zeros((8, 8)), name="nuclei")
    w = CountWidget(viewer)  # the Count dock takes the file as the image's count and draws it as rings
    assert w.image.value.name == "nuclei" and np.all(plain.face_color[:, 3] == 0)
    np.testing.assert_allclose(plain.border_color[:, :3], [[1, 1, 0], [0, 1, 1]])
    assert w.count_label.text().startswith("Count: 2 (1 from the model, 1 added by hand)")


def test_regression_model_shows_window_counts_not_points(open_dock, make_napari_viewer, qtbot, tmp_path):
    import torch

    from cellsynth.count.models import counter_config, new_counter, save_counter

    torch.manual_seed(0)
    counter = new_counter(counter_config("regression", backbone="test_efficientnet", window=64), device="cpu")
    save_counter(counter.net, counter.config, tmp_path / "reg")
    viewer = make_napari_viewer()
    viewer.add_image(_layout().image, name="nuclei")
    w = open_dock(viewer, "Count cells")
    w.model.value = "file"
    w.model_file.value = tmp_path / "reg" / "model.safetensors"
    w.diameter.value.value = counter.diameter  # at the model's own scale: windows of 64 image pixels
    assert _run(qtbot, w) == "done"
    assert result_name("nuclei") not in viewer.layers
    shapes = viewer.layers["nuclei window counts"]
    assert len(shapes.data) == 2 * 2  # 96x128 image in 64 px windows
    total = float(np.sum(shapes.features["count"]))
    assert "Regression model" in w.count_label.text() and "no cell positions" in w.count_label.text()
    shown = float(w.count_label.text().split(": ")[1].split(" ")[0])
    assert shown == pytest.approx(total, abs=0.05 * len(shapes.data) + 0.05)  # window counts shown to 0.1


@pytest.mark.slow
def test_the_first_count_does_not_export_in_the_window(open_dock, make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """Opening the dock starts the one-time export in another process; the first Count waits for it and says so."""
    import time

    from cellsynth._napari import _counting
    from cellsynth._napari.sample import sample_nuclei
    from cellsynth.count import engines

    monkeypatch.setenv("CELLSYNTH_ONNX_CACHE", str(tmp_path / "onnx"))
    monkeypatch.setattr(_counting, "_PREPARING", {})
    viewer = make_napari_viewer()
    data, kwargs, _ = sample_nuclei()[0]
    viewer.add_image(data, **kwargs)
    t = time.perf_counter()
    w = open_dock(viewer, "Count cells")
    assert time.perf_counter() - t < 2.0 and _counting._PREPARING["default"].poll() is None  # started, not awaited

    def no_export(*args, **kwargs):
        raise AssertionError("the export ran in the window's process")

    monkeypatch.setattr(engines, "_export", no_export)
    messages = []
    w.runner._bridge.progress.connect(lambda p: messages.append(getattr(p, "message", "")))
    assert _run(qtbot, w) == "done"
    assert _counting._PREPARING["default"].returncode == 0 and list((tmp_path / "onnx").glob("*.onnx"))
    assert w.count_label.text().startswith("Count: ")
    assert any("preparing the counter for this computer" in m for m in messages)


def test_compare_with_an_annotation_marks_extra_and_missed(open_dock, make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    lay = _layout()
    img = viewer.add_image(lay.image, name="nuclei", scale=(0.5, 0.5), translate=(3.0, 4.0))
    w = open_dock(viewer, "Count cells")
    w.model.value = "classic"
    w.diameter.value.value = 15.0
    assert _run(qtbot, w) == "done"
    counted = viewer.layers[result_name("nuclei")]
    n = len(counted.data)
    # an annotation in world coordinates (another scale): the counted points, one moved far off, one added
    truth = counted.data * 0.5 + (3.0, 4.0)
    truth = np.concatenate([truth[1:], [[3.0 + 0.5 * 2, 4.0 + 0.5 * 2]]])
    truth[0] += 0.5 * 3.0  # 3 px off: still within half the 15 px diameter
    ann = viewer.add_points(truth, name="my annotation")
    w.compare.annotation.value = ann
    m = w.compare.compare()
    assert (m["tp"], m["fp"], m["fn"]) == (n - 1, 1, 1)
    text = w.compare.result.text()
    assert f"{n - 1} matched, 1 extra" in text and "1 missed" in text and "F1" in text
    marks = viewer.layers["nuclei comparison"]
    assert list(marks.features["kind"]) == ["extra", "missed"]
    assert tuple(marks.scale) == tuple(img.scale) and np.allclose(marks.data[0], counted.data[0])
    assert viewer.layers.selection.active is counted  # clicks still go to the count
    w.compare.compare()  # again: the marks are replaced, not stacked
    assert [lay.name for lay in viewer.layers].count("nuclei comparison") == 1


def test_nuclei_cut_by_the_border_can_be_left_out(open_dock, make_napari_viewer, qtbot):
    from cellsynth.count.metrics import cut_by_border

    viewer = make_napari_viewer()
    lay = _layout()
    viewer.add_image(lay.image, name="nuclei")
    w = open_dock(viewer, "Count cells")
    w.model.value = "classic"
    w.diameter.value.value = 15.0
    assert _run(qtbot, w) == "done"
    pts = viewer.layers[result_name("nuclei")]
    n = len(pts.data)
    cut = int(cut_by_border(pts.data, lay.image.shape, radius=7.5).sum())
    assert cut > 0 and f"{cut} cut by the border counted" in w.count_label.text()
    pts.add([[1.0, 1.0]])  # a point added by hand on the border stays
    w.exclude_border.value = True
    assert len(pts.data) == n - cut + 1 and pts.metadata["count"] == n - cut + 1
    assert f"{cut} cut by the border left out" in w.count_label.text()
    assert not cut_by_border(pts.data[pts.features["source"] == "model"], lay.image.shape, radius=7.5).any()
    assert _run(qtbot, w) == "done"  # a re-run keeps the choice
    assert len(pts.data) == n - cut + 1 and w.exclude_border.value is True
    w.exclude_border.value = False
    assert len(pts.data) == n + 1


def test_cells_per_region_follow_regions_and_clicks(open_dock, make_napari_viewer, qtbot, tmp_path):
    from skimage.draw import disk

    img = np.full((100, 200), 10, np.uint8)
    for c in [(20, 20), (20, 60), (60, 40), (80, 80), (30, 140), (70, 160), (90, 190)]:
        img[disk(c, 4, shape=img.shape)] = 200
    viewer = make_napari_viewer()
    viewer.add_image(img, name="nuclei", scale=(0.5, 0.5))  # 0.5 µm per pixel
    w = open_dock(viewer, "Count cells")
    w.model.value = "classic"
    w.diameter.value.value = 8.0
    assert _run(qtbot, w) == "done"
    rect = np.array([[0, 0], [0, 99], [99, 99], [99, 0]], float) * 0.5  # world coordinates
    ell = np.array([[10, 120], [10, 180], [90, 180], [90, 120]], float) * 0.5
    shapes = viewer.add_shapes([rect, ell], shape_type=["rectangle", "ellipse"], name="areas")
    w.regions.shapes.value = shapes
    rows = w.regions.rows
    assert [r["count"] for r in rows] == [4, 2] and rows[0]["area_um2"] == 2500.0 and rows[0]["per_mm2"] == 1600.0
    assert w.regions.table.item(0, 1).text() == "4" and w.regions.table.isVisibleTo(w)
    pts = viewer.layers[result_name("nuclei")]
    pts.add([[40.0, 150.0]])  # a click in the ellipse: its row follows
    assert [r["count"] for r in w.regions.rows] == [4, 3]
    names = [r["region"] for r in w.regions.rows]  # each point carries the regions holding it
    assert sorted(pts.features["region"]) == sorted([names[0]] * 4 + [names[1]] * 3 + [""] * (len(pts.data) - 7))
    shapes.data = [rect]  # the ellipse deleted: its row goes
    assert [r["count"] for r in w.regions.rows] == [4]
    assert list(pts.features["region"]).count(names[1]) == 0
    from cellsynth._napari.points_io import write_points

    saved = write_points(str(tmp_path / "cells.csv"), pts.data, {"features": pts.features, "scale": pts.scale,
                                                                 "translate": pts.translate})
    header = open(saved[0]).readline().strip().split(",")
    assert {"row_world", "col_world", "score", "source", "region"} <= set(header)
    out = w.regions.export(str(tmp_path / "regions.csv"))
    assert out.read_text().splitlines()[0].startswith("region,kind,count,area_px")


def test_marker_classes_from_other_layers_reclassify_at_once(open_dock, make_napari_viewer, qtbot):
    from skimage.draw import disk

    rng = np.random.default_rng(3)
    nuclei, ki67 = np.zeros((120, 120), np.uint16), np.zeros((120, 120), np.uint16)
    centres = [(20 + 40 * i, 20 + 40 * j) for i in range(3) for j in range(3)]
    for k, c in enumerate(centres):
        rr, cc = disk(c, 6, shape=nuclei.shape)
        nuclei[rr, cc] = 800
        ki67[rr, cc] = 300 + 100 * k if k < 4 else 20  # 4 positive
    nuclei += rng.integers(0, 10, nuclei.shape).astype(np.uint16)
    viewer = make_napari_viewer()
    viewer.add_image(nuclei, name="DAPI")
    viewer.add_image(ki67, name="Ki67")
    w = open_dock(viewer, "Count cells")
    w.image.value = viewer.layers["DAPI"]
    w.model.value = "classic"
    w.diameter.value.value = 12.0
    assert _run(qtbot, w) == "done"
    assert list(w.markers.markers.choices) == [("layer", "Ki67")]  # DAPI itself is not offered
    w.markers.markers.value = [("layer", "Ki67")]
    summary = w.markers.classify()
    assert {r["class"]: r["count"] for r in summary["classes"]} == {"negative": 5, "Ki67+": 4}
    pts = viewer.layers[result_name("DAPI")]
    assert sorted(pts.features["class"]) == ["Ki67+"] * 4 + ["negative"] * 5
    assert "Ki67+: 4 (44.44 %)" in w.markers.result.text()
    w.markers.thresholds.value = "450"  # typed: re-classified at once, no new count
    assert {r["class"]: r["count"] for r in w.markers.summary["classes"]} == {"negative": 7, "Ki67+": 2}  # 500, 600
    assert w.markers.summary["threshold_method"] == "typed"


@pytest.mark.slow
def test_count_a_folder_shows_a_table_opens_an_image_with_its_points_and_resumes(open_dock, make_napari_viewer,
                                                                                  qtbot, tmp_path):
    from pathlib import Path

    from napari.layers import Points
    from skimage.draw import disk

    from cellsynth import io

    folder = tmp_path / "plate"
    folder.mkdir()
    for name, n in (("a", 3), ("b", 5)):
        img = np.full((64, 200), 10, np.uint8)
        for k in range(n):
            img[disk((32, 20 + 35 * k), 6)] = 200
        io.write_tiff(folder / f"{name}.tif", img)
    viewer = make_napari_viewer()
    w = open_dock(viewer, "Count cells")
    w.model.value = "classic"
    w.diameter.value.value = 12.0
    w.folder.folder.value = str(folder)
    w.folder.workers = 1

    def run():
        with qtbot.waitSignal(w.runner.finished, timeout=240000) as blocker:
            w.folder.count_button.native.click()
        assert blocker.args[0] == "done", w.runner.last_error

    run()
    assert {Path(r["image"]).name: r["count"] for r in w.folder.rows} == {"a.tif": 3, "b.tif": 5}
    assert w.folder.table.rowCount() == 2 and (folder / "cellsynth-counts" / "counts.csv").is_file()
    assert w.folder.table.isVisibleTo(w) and "2 counted now" in w.folder.title.text()
    w.folder.table.cellClicked.emit([Path(r["image"]).name for r in w.folder.rows].index("b.tif"), 0)
    points = [layer for layer in viewer.layers if isinstance(layer, Points)]
    assert "b" in viewer.layers and len(points) == 1 and len(points[0].data) == 5
    run()  # again: the results are kept, nothing is counted twice
    assert "0 counted now, 2 kept from before" in w.folder.title.text()
