"""The event loop stays responsive while long jobs run: a timer probe measures the longest stall.

A QTimer ticks every 5 ms on the GUI thread; the longest gap between ticks while a job runs
(worker start to result layers shown) is the longest time the window could not react. The
first run of a session also pays one-off costs that are not the widgets' (torch's import
holding the interpreter lock, napari compiling the first Points layer's shaders), so each job
runs once to warm up and the second run is measured.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

napari = pytest.importorskip("napari")
pytest.importorskip("torch")

from qtpy.QtCore import QElapsedTimer, QTimer  # noqa: E402

from cellsynth._napari.count_widget import CountWidget  # noqa: E402
from cellsynth._napari.layouts_widget import LayoutsWidget  # noqa: E402
from cellsynth._napari.nsc_widget import NSCWidget  # noqa: E402
from cellsynth._napari.stain_widget import StainWidget  # noqa: E402

#: The longest stall accepted per job on a shared, loaded test machine under Xvfb. There, one
#: repaint of the window (software OpenGL composing the canvas) alone takes 100-250 ms (printed
#: as "frame"), and napari takes 15-80 ms to update a result layer or add a bar to its activity
#: dock; jobs measured 150-550 ms there. On the same machine when quiet (frame 28 ms) they
#: measured: count 67-92, layouts 64, NSC 65, staining 83-120 ms. The goal on a desktop with a
#: GPU is 100 ms.
STALL_LIMIT_MS = {"count": 800, "layout": 800, "nsc": 800, "stain": 800}


class StallProbe:
    """Longest gap between ticks of a 5 ms GUI-thread timer since ``reset()``."""

    def __init__(self) -> None:
        self.clock = QElapsedTimer()
        self.clock.start()
        self.last = self.clock.elapsed()
        self.longest = 0
        self.label = self.where = ""
        self.timer = QTimer()
        self.timer.setInterval(5)
        self.timer.timeout.connect(self._tick)
        self.timer.start()

    def _tick(self) -> None:
        now = self.clock.elapsed()
        if now - self.last > self.longest:
            self.longest, self.where = now - self.last, self.label
        self.last = now

    def reset(self) -> None:
        self.last = self.clock.elapsed()
        self.longest = 0


def _frame_ms(qtbot) -> float:
    """Median time of one synchronous repaint of the main window: the floor of any stall that redraws."""
    import time

    from qtpy.QtWidgets import QApplication, QMainWindow

    window = next(w for w in QApplication.topLevelWidgets() if isinstance(w, QMainWindow) and w.isVisible())
    times = []
    for _ in range(5):
        t = time.perf_counter()
        window.repaint()
        times.append((time.perf_counter() - t) * 1000)
        qtbot.wait(10)
    return float(np.median(times))


def _run(qtbot, widget, start, probe, timeout=180000) -> int:
    with qtbot.waitSignal(widget.runner.finished, timeout=timeout) as blocker:
        start()
    assert blocker.args == ["done"], widget.runner.last_error
    qtbot.wait(50)  # the result layers' first draw
    return probe.longest


def _tiny_stain_model(folder):
    import torch

    from cellsynth.stain.model import StainModelConfig, build_unet, save_stain_model

    torch.manual_seed(0)
    cfg = StainModelConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=8, sample_size=16,
                           num_train_timesteps=20, attention_head_dim=4, dropout=0.0,
                           condition_norm={"low": [0.0] * 3, "high": [255.0] * 3, "mean": [0.5] * 3, "std": [0.3] * 3})
    save_stain_model(build_unet(cfg), cfg, folder)
    return folder


@pytest.mark.slow  # a timing benchmark of four real jobs (each run twice): the whole suite runs it, the quick run not
@pytest.mark.usefixtures("one_torch_thread")
def test_long_jobs_never_stall_the_event_loop(open_dock, make_napari_viewer, qtbot, capsys, tmp_path):
    from cellsynth.io import read_tiff

    viewer = make_napari_viewer(show=True)
    nuclei = read_tiff(Path(__file__).resolve().parents[2] / "resources" / "samples" / "neurocyte_010.tif")[0]
    viewer.add_image(nuclei[:256, :256], name="nuclei")
    bf = viewer.add_image(np.random.default_rng(0).integers(0, 255, (3, 64, 64)).astype(np.uint8), name="bf")
    count, layouts, nsc, stain = open_dock(viewer, "Count cells"), open_dock(viewer, "Cell layouts"), open_dock(viewer, "NSC masks"), open_dock(viewer, "Virtual staining")
    for w in (count, layouts, nsc, stain):
        viewer.window.add_dock_widget(w)
    layouts.form.set_values({"shape": (256, 256)})
    nsc.layer.value = viewer.layers["nuclei"]
    stain.layer.value, stain.model.value = bf, _tiny_stain_model(tmp_path / "stain")
    stain.form.set_values({"steps": 2, "guidance": False})
    probe = StallProbe()
    jobs = {"count": (count, count.run), "layout": (layouts, layouts.generate), "nsc": (nsc, nsc.run),
            "stain": (stain, stain.run)}
    stalls = {}
    for name, (widget, start) in jobs.items():
        _run(qtbot, widget, start, probe)  # warm-up
        probe.reset()
        stalls[name] = _run(qtbot, widget, start, probe)
    frame = _frame_ms(qtbot)
    with capsys.disabled():
        print(f"\nlongest event-loop stall per job (ms): {stalls}; one window repaint (frame): {frame:.0f} ms")
    over = {name: ms for name, ms in stalls.items() if ms >= STALL_LIMIT_MS[name]}
    assert not over, f"stalls over the limits {STALL_LIMIT_MS}: {over} (all: {stalls})"


def test_the_probe_sees_a_stall_on_the_gui_thread(qtbot):
    import time

    probe = StallProbe()
    qtbot.wait(30)
    probe.reset()
    time.sleep(0.25)  # work done on the GUI thread, as a widget must never do
    qtbot.wait(30)
    assert probe.longest >= 240
