"""The shared task runner: heavy imports after a viewer exists, progress, cancel."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import napari
    from cellsynth._napari._tasks import avoid_llvm_clash
    viewer = napari.Viewer(show=True)
    viewer.add_image(__import__("numpy").zeros((8, 8)))
    blocked = avoid_llvm_clash()
    import torch, diffusers
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8,), down_block_types=("DownBlock2D",),
                                 up_block_types=("UpBlock2D",), norm_num_groups=4)
    out = unet(torch.zeros(1, 1, 8, 8), 1).sample
    print("ok", blocked, tuple(out.shape))
    viewer.close()
    """
)


@pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs an X server (pytest-xvfb provides one)")
def test_heavy_imports_after_a_viewer_do_not_crash():
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ok" in res.stdout and "(1, 1, 8, 8)" in res.stdout


def test_runner_reports_progress_and_cancel(qtbot):
    from cellsynth._napari._tasks import TaskRunner
    from cellsynth.progress import report

    runner = TaskRunner()
    seen = []

    def work(progress):
        for i in range(1, 4):
            report(progress, "steps", i, 3)
        return 42

    with qtbot.waitSignal(runner.finished, timeout=10000) as blocker:
        runner.start(work, on_done=seen.append)
    assert blocker.args == ["done"] and seen == [42]
    assert runner.bar.maximum() == 1 and runner.bar.value() == 1 and runner.status.text() == "Done"

    import threading

    gate = threading.Event()

    def slow(progress):
        gate.wait(5)
        report(progress, "steps", 1, 2)
        return "never"

    with qtbot.waitSignal(runner.finished, timeout=10000) as blocker:
        runner.start(slow, on_done=seen.append)
        with pytest.raises(RuntimeError, match="already running"):
            runner.start(slow, on_done=seen.append)
        runner.cancel()
        gate.set()
    assert blocker.args == ["cancelled"] and seen == [42]
    assert "Cancelled" in runner.status.text()

    def broken(progress):
        raise ValueError("bad input: expected a 2D image")

    with qtbot.waitSignal(runner.finished, timeout=10000) as blocker:
        runner.start(broken, on_done=seen.append)
    assert blocker.args == ["error"] and "expected a 2D image" in runner.status.text()
    assert isinstance(runner.last_error, ValueError) and seen == [42]


def _activity_bars(label):
    from napari.utils.progress import progress

    return [bar for bar in progress._all_instances if str(bar.desc).startswith(label)]


def test_runs_show_in_napari_activity_dock(make_napari_viewer, qtbot):
    """Each run has a determinate bar in the activity dock, closed at its end; its Cancel cancels the run."""
    import threading

    from qtpy.QtWidgets import QProgressBar

    from cellsynth._napari._tasks import TaskRunner
    from cellsynth.progress import report

    viewer = make_napari_viewer()
    dock = viewer.window._qt_window._activity_dialog
    runner = TaskRunner()
    halfway, gate = threading.Event(), threading.Event()

    def work(progress):
        report(progress, "tiles", 1, 4)
        report(progress, "tiles", 2, 4)
        halfway.set()
        gate.wait(10)
        report(progress, "download", 3 * 10**9, 4 * 10**9)  # bytes: more than a Qt bar counts
        halfway.clear()
        gate.clear()
        halfway.set()
        gate.wait(10)
        report(progress, "download", 4 * 10**9, 4 * 10**9)
        return 1

    with qtbot.waitSignal(runner.finished, timeout=20000) as blocker:
        runner.start(work, on_done=lambda r: None, label="Counting")
        qtbot.waitUntil(lambda: halfway.is_set() and [(b.n, b.total) for b in _activity_bars("Counting")]
                        == [(2, 4)], timeout=10000)
        (bar,) = _activity_bars("Counting")
        assert bar.desc.startswith("Counting: tiles")
        shown = [b for b in dock.findChildren(QProgressBar) if b.maximum() == 4 and b.value() == 2]
        assert shown, "the run's bar is not in the activity dock"
        gate.set()
        qtbot.waitUntil(lambda: bar.desc.startswith("Counting: download") and bar.n > 0, timeout=10000)
        assert bar.n / bar.total == 0.75 and bar.total < 2**31 and runner.bar.maximum() < 2**31
        assert runner.bar.value() / runner.bar.maximum() == 0.75
        gate.set()
    assert blocker.args == ["done"] and _activity_bars("Counting") == []

    halfway.clear()

    def slow(progress):
        report(progress, "steps", 1, 3)
        halfway.set()
        for _ in range(200):
            report(progress, "steps", 1, 3)
            threading.Event().wait(0.02)
        return "never"

    with qtbot.waitSignal(runner.finished, timeout=20000) as blocker:
        runner.start(slow, on_done=lambda r: None, label="Staining")
        qtbot.waitUntil(lambda: halfway.is_set() and len(_activity_bars("Staining")) == 1, timeout=10000)
        _activity_bars("Staining")[0].cancel()  # the Cancel button of the activity dock
    assert blocker.args == ["cancelled"] and _activity_bars("Staining") == []
