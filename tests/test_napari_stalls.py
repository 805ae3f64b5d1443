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

#: The longest stall accepted on a shared, loaded test machine (measured there: 200-500 ms after
#: warm-up, from napari updating and drawing the result layers); the goal on a desktop is 100 ms.
STALL_LIMIT_MS = 1000


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


def _run(qtbot, widget, start, probe, timeout=180000) -> int:
    with qtbot.waitSignal(widget.runner.finished, timeout=timeout) as blocker:
        start()
    assert blocker.args == ["done"], widget.runner.last_error
    qtbot.wait(50)  # the result layers' first draw
    return probe.longest


@pytest.mark.usefixtures("one_torch_thread")
def test_long_jobs_never_stall_the_event_loop(make_napari_viewer, qtbot, capsys):
    from cellsynth.io import read_tiff

    viewer = make_napari_viewer(show=True)
    nuclei = read_tiff(Path(__file__).resolve().parents[1] / "resources" / "samples" / "neurocyte_010.tif")[0]
    viewer.add_image(nuclei[:256, :256], name="nuclei")
    count, layouts, nsc = CountWidget(viewer), LayoutsWidget(viewer), NSCWidget(viewer)
    for w in (count, layouts, nsc):
        viewer.window.add_dock_widget(w)
    layouts.form.set_values({"shape": (256, 256)})
    nsc.layer.value = viewer.layers["nuclei"]
    probe = StallProbe()
    jobs = {"count": (count, count.run), "layout": (layouts, layouts.generate), "nsc": (nsc, nsc.run)}
    stalls = {}
    for name, (widget, start) in jobs.items():
        _run(qtbot, widget, start, probe)  # warm-up
        probe.reset()
        stalls[name] = _run(qtbot, widget, start, probe)
    with capsys.disabled():
        print("\nlongest event-loop stall per job (ms):", stalls)
    assert all(ms < STALL_LIMIT_MS for ms in stalls.values()), stalls


def test_the_probe_sees_a_stall_on_the_gui_thread(qtbot):
    import time

    probe = StallProbe()
    qtbot.wait(30)
    probe.reset()
    time.sleep(0.25)  # work done on the GUI thread, as a widget must never do
    qtbot.wait(30)
    assert probe.longest >= 240
