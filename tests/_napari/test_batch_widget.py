"""Counting a stack in the Count cells dock: per-frame table, plot, jump to a frame, CSV export; lazy layers."""

import csv

import dask.array as da
import numpy as np
from skimage.draw import disk

from cellsynth._napari.count_widget import CountWidget, result_name
from cellsynth._napari.frame_table import estimate_input, is_lazy, layer_pixels
from cellsynth.count import count_cells


def _stack(n_frames=4):
    rng = np.random.default_rng(0)
    frames = []
    for t in range(n_frames):
        img = rng.normal(200, 10, (80, 96))
        for k in range(2 + 2 * t):
            img[disk((12 + 18 * (k // 4), 12 + 22 * (k % 4)), 6, shape=img.shape)] += 900
        frames.append(img)
    return np.clip(np.stack(frames), 0, 65535).astype(np.uint16)


def _run(qtbot, w):
    with qtbot.waitSignal(w.runner.finished, timeout=120000) as blocker:
        w.run_button.native.click()
    return blocker.args[0]


def test_stack_count_shows_a_table_per_frame_and_a_click_moves_the_viewer(open_dock, make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    stack = _stack()
    viewer.add_image(stack, name="movie", scale=(2.0, 0.5, 0.5))
    w = open_dock(viewer, "Count cells")
    w.model.value = "classic"
    w.diameter.value.value = 12.0
    assert _run(qtbot, w) == "done"
    table = w.frame_table
    assert table.isVisibleTo(w) and table.table.rowCount() == 4
    expected = [count_cells(f, model="classic", diameter=12.0).count for f in stack]
    assert expected == [2, 4, 6, 8]
    assert [int(table.table.item(i, 1).text()) for i in range(4)] == expected
    assert len(viewer.layers[result_name("movie")].data) == sum(expected)
    line = table.axes.get_lines()[0]
    assert list(line.get_ydata()) == expected  # the plot shows the same counts
    assert table.axes.get_ylim()[0] == 0  # from zero: one cell more looks like one cell more
    table.table.cellClicked.emit(2, 0)
    assert viewer.dims.current_step[0] == 2
    # the count shown is the frame's, the total after it; it follows the slider
    assert w.count_label.text().startswith(f"Count: {expected[2]} in frame 2 ")
    assert f"{sum(expected)} in 4 frames" in w.count_label.text()
    viewer.dims.set_current_step(0, 3)
    assert w.count_label.text().startswith(f"Count: {expected[3]} in frame 3 ")
    out = table.export(str(tmp_path / "frames.csv"))
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["count"]) for r in rows] == expected and rows[0]["diameter"] == "12.0"
    assert table.export(str(tmp_path / "frames.csv")) is None  # an existing file is not replaced
    # a single image hides the section again
    viewer.add_image(stack[1], name="one")
    w.image.value = viewer.layers["one"]
    assert w.count_label.text() == "No count yet" and not table.isVisibleTo(w)  # not the movie's result
    qtbot.wait(50)  # hiding the section may draw it once more
    drawn = []
    table.figure.canvas.mpl_connect("draw_event", lambda event: drawn.append(event))
    assert _run(qtbot, w) == "done"
    assert not table.isVisibleTo(w)
    qtbot.wait(50)
    assert drawn == []  # the hidden plot is not redrawn (drawing a figure holds the GUI thread ~0.1 s)


def test_dask_layer_is_counted_lazily_with_the_same_points(open_dock, make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    stack = _stack(3)
    lazy = da.from_array(stack, chunks=(1, 40, 48))
    layer = viewer.add_image(lazy, name="lazy movie")
    assert is_lazy(layer_pixels(layer)) and not is_lazy(np.zeros(3))
    assert estimate_input(lazy).shape == (80, 96)  # the middle plane's crop, not the stack
    w = open_dock(viewer, "Count cells")
    w.model.value = "classic"
    w.diameter.value.value = 12.0
    assert _run(qtbot, w) == "done"
    pts = viewer.layers[result_name("lazy movie")]
    ref = count_cells(stack, model="classic", diameter=12.0)
    got = pts.data[np.lexsort((pts.data[:, 2], pts.data[:, 1], pts.data[:, 0]))]
    want = ref.points[np.lexsort((ref.points[:, 2], ref.points[:, 1], ref.points[:, 0]))]
    assert np.allclose(got, want)
    assert w.frame_table.table.rowCount() == 3
    assert isinstance(layer.data, da.Array)  # the layer was not replaced by a loaded copy
