"""One way to run long work from a widget: off the GUI thread, with progress and Cancel.

``TaskRunner`` is a small panel (status text, progress bar, Cancel button) that
runs one core function at a time in a napari worker thread. The function gets a
:data:`cellsynth.progress.ProgressCallback`; progress events are shown in the bar,
and Cancel makes the next callback raise :class:`cellsynth.progress.Cancelled`.
``on_done(result)`` runs on the GUI thread after the worker returns; it is the
only place where layers are added or updated, so a cancelled or failed run
leaves the viewer as it was.

Each run also appears in napari's activity dock (a :class:`napari.utils.progress`
bar with the same progress and its own Cancel), closed when the run ends.
"""

from __future__ import annotations

import inspect
import threading
import traceback
from collections.abc import Callable
from typing import Any, Optional

from napari.qt.threading import create_worker
from napari.utils.notifications import show_error
from qtpy.QtCore import QObject, Qt, Signal
from qtpy.QtWidgets import (QFrame, QHBoxLayout, QLabel, QProgressBar, QPushButton, QScrollArea, QVBoxLayout,
                            QWidget)

from .._llvm_guard import avoid_llvm_clash
from ..progress import Cancelled, Progress

__all__ = ["TaskRunner", "avoid_llvm_clash", "dock_layout", "stop_all"]


class _Scroll(QScrollArea):
    """Scrolls up and down only, and is never narrower than its controls (a dock is then not clipped)."""

    def minimumSizeHint(self):  # noqa: N802 (Qt's name)
        hint = super().minimumSizeHint()
        if self.widget() is not None:
            bar = self.verticalScrollBar().sizeHint().width()
            hint.setWidth(max(hint.width(), self.widget().minimumSizeHint().width() + bar))
        return hint

    def sizeHint(self):  # noqa: N802 (Qt's name)
        hint = super().sizeHint()
        hint.setWidth(max(hint.width(), self.minimumSizeHint().width()))
        return hint


def dock_layout(widget: QWidget, footer: QWidget) -> QVBoxLayout:
    """Give a dock widget a scroll area for its controls and a footer (the task panel) always in view.

    Returns the layout inside the scroll area, so that a dock never grows taller than the screen.
    """
    inner = QWidget()
    layout = QVBoxLayout(inner)
    layout.setContentsMargins(0, 0, 0, 0)
    scroll = _Scroll()
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    scroll.setWidget(inner)
    outer = QVBoxLayout(widget)
    outer.addWidget(scroll, 1)
    outer.addWidget(footer)
    return layout


class _Bridge(QObject):
    """Lives on the GUI thread; signals emitted from the worker arrive queued."""

    progress = Signal(object)


class _Run:
    """One task's thread-side state: cancel request, end of the work, and the worker kept alive until then."""

    def __init__(self, *, detach: bool = False) -> None:
        self.cancel = threading.Event()
        self.ended = threading.Event()
        self.detach = detach
        self.worker = None
        self.activity = None  # its bar in napari's activity dock (GUI thread only)
        self.activity_desc = ""
        self.activity_pending = False  # an update of the bar is scheduled
        self.showing = False  # the bar is being updated (napari processes events meanwhile)

    def close_activity(self) -> None:
        """Remove the run's bar from the activity dock (GUI thread; idempotent).

        While the bar is being redrawn (napari processes events inside that), the
        close waits for the next event-loop turn.
        """
        bar, self.activity = self.activity, None
        if bar is None:
            return
        if self.showing:
            from qtpy.QtCore import QTimer

            QTimer.singleShot(0, bar.close)
        else:
            bar.close()

    def stop(self, timeout: float = 10.0) -> bool:
        """Ask the work to stop at its next progress step and wait for it; True when it ended."""
        self.cancel.set()
        return self.ended.wait(timeout)


#: How long Cancel waits for a detachable run to reach its next step before freeing the panel.
CANCEL_GRACE_MS = 500

#: The activity dock's bar is updated at most this often (each update processes Qt events).
ACTIVITY_INTERVAL_MS = 100

#: Qt progress bars count in 32-bit integers; larger totals (bytes of a download) are scaled down.
_BAR_MAX = 2**31 - 1


def _bar_range(step: int, total: int) -> tuple:
    """``(value, maximum)`` for a Qt progress bar: `step` of `total`, scaled to fit 32 bits."""
    if total <= _BAR_MAX:
        return int(min(step, total)), int(total)
    scale = -(-total // 1_000_000)  # a million steps are finer than any bar is drawn
    return int(min(step, total) // scale), int(total // scale)


def _activity_bar(label: str, cancel: Callable[[], None]):
    """A bar in napari's activity dock whose Cancel button cancels the run.

    :class:`napari.utils.progress` is napari's public way to show long work in the
    activity dock; :class:`~napari.utils.progress.cancelable_progress` gives it a
    Cancel button, which here asks the run to stop. Without a napari window the
    bar only writes to a discarded text stream.
    """
    import io

    from napari.utils.progress import cancelable_progress

    class _ActivityBar(cancelable_progress):
        def cancel(self) -> None:
            super().cancel()
            cancel()

    return _ActivityBar(desc=label, total=0, file=io.StringIO(), leave=False)

#: Runs whose work has not ended. Their workers stay referenced here, so that a closed widget
#: (or viewer) never leaves a thread emitting through deleted Qt objects.
_RUNS: set = set()


def stop_all(timeout: float = 10.0) -> bool:
    """Cancel every running task of every widget and wait for their threads; True when all ended.

    Called when the application quits. A run whose widget napari deleted (a closed viewer) stops at
    its next progress step on its own.
    """
    ok = True
    for run in list(_RUNS):
        ok = run.stop(timeout) and ok
    return ok


def _on_quit() -> None:
    stop_all()


_QUIT_HOOKED = False


def _hook_quit() -> None:
    global _QUIT_HOOKED
    if _QUIT_HOOKED:
        return
    from qtpy.QtCore import QCoreApplication

    app = QCoreApplication.instance()
    if app is not None:
        app.aboutToQuit.connect(_on_quit)
        _QUIT_HOOKED = True


class TaskRunner(QWidget):
    """Status line, progress bar and Cancel button for one long operation at a time.

    Signals
    -------
    finished(str)
        ``"done"``, ``"cancelled"`` or ``"error"``, after ``on_done`` has run.
    """

    finished = Signal(str)
    busy = Signal(bool)

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self._bridge = _Bridge()
        self._bridge.progress.connect(self._on_progress)
        self._run: Optional[_Run] = None
        self._alive = _Alive(self)
        self.worker = None
        self.last_error: Optional[BaseException] = None
        self._runs: list = []  # this widget's runs not yet ended

        self.status = QLabel("Ready")
        self.status.setWordWrap(True)
        self.bar = QProgressBar()
        self.bar.setTextVisible(True)
        self.bar.setRange(0, 1)
        self.bar.setValue(0)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        row = QHBoxLayout()
        row.addWidget(self.bar, 1)
        row.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.status)
        layout.addLayout(row)

    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(
        self,
        fn: Callable[..., Any],
        *,
        on_done: Callable[[Any], None],
        label: str = "Working",
        detach_on_cancel: bool = False,
        cancelled_text: Optional[Callable[[Optional[Progress]], str]] = None,
    ) -> None:
        """Run ``fn(progress=callback)`` in a worker thread; then ``on_done(result)`` on the GUI thread.

        ``on_done`` may be a generator: each of its steps (e.g. one result layer) then runs in
        its own event-loop turn, so the window stays responsive while results are shown;
        ``finished`` is emitted after the last one.

        ``cancelled_text(last_progress)`` says what a cancel left behind (default: nothing
        was changed), for work that writes files as it goes.

        With ``detach_on_cancel`` (work that writes nothing: its result is only shown), Cancel
        frees the panel within :data:`CANCEL_GRACE_MS` even when the work is inside a long step
        without progress calls; the thread stops at its next step and its result is dropped.

        Raises
        ------
        RuntimeError
            If another task of this runner is still running.
        """
        if self.running:
            raise RuntimeError("a task is already running; wait for it or press Cancel")
        avoid_llvm_clash()
        _hook_quit()
        self.last_error = None
        run = self._run = _Run(detach=detach_on_cancel)
        self._last_progress: Optional[Progress] = None
        self._cancelled_text = cancelled_text
        cancel, bridge, alive = run.cancel, self._bridge, self._alive

        def callback(p: Progress) -> None:
            if not alive["yes"]:  # the widget was closed (e.g. with the viewer): stop here
                cancel.set()
            if cancel.is_set():
                raise Cancelled()
            try:
                bridge.progress.emit(p)
            except RuntimeError:  # the widget is gone: nobody waits for this result
                cancel.set()
                raise Cancelled() from None

        def work():
            try:
                result = fn(progress=callback)
                if cancel.is_set():
                    raise Cancelled()
                return result
            finally:
                run.ended.set()

        self.status.setText(f"{label}…")
        self.status.setToolTip("")
        self._label = label
        self.bar.setRange(0, 0)  # busy until the first progress event
        self.cancel_button.setEnabled(True)
        self.busy.emit(True)
        worker = create_worker(work, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(lambda result: alive["yes"] and run is self._run
                                and self._finish("done", result, on_done))
        worker.errored.connect(lambda exc: alive["yes"] and run is self._run and self._on_error(exc))
        worker.finished.connect(lambda: (_RUNS.discard(run), run.close_activity()))
        run.worker = worker
        _RUNS.add(run)
        self._runs[:] = [r for r in self._runs if not r.ended.is_set()] + [run]
        self.worker = worker
        worker.start()
        self._open_activity(run, worker, label)

    def _open_activity(self, run: "_Run", worker, label: str) -> None:
        """Show the run in napari's activity dock (napari processes events while adding the bar)."""
        alive = self._alive
        try:
            bar = _activity_bar(label, lambda: run is self._run and alive["yes"] and self.cancel())
        except Exception:  # the activity dock is a courtesy: never a reason for a run to fail
            return
        run.activity, run.activity_desc = bar, label
        if self.worker is not worker:  # the run ended while the bar was being added
            run.close_activity()
        elif self._last_progress is not None:  # progress that arrived while the bar was being added
            self._activity_later(run)

    def cancel(self) -> None:
        """Ask the running task to stop at its next progress step."""
        if self.running and self._run is not None:
            run = self._run
            run.cancel.set()
            self.status.setText("Cancelling…")
            self.cancel_button.setEnabled(False)
            if run.detach:
                from qtpy.QtCore import QTimer

                alive = self._alive
                QTimer.singleShot(CANCEL_GRACE_MS, lambda: alive["yes"] and self._detach(run))

    def _detach(self, run: "_Run") -> None:
        """Free the panel from a cancelled run still inside a step; its thread ends on its own."""
        if run is not self._run or run.ended.is_set():
            return  # finished meanwhile: its own signal updates the panel
        self._run = None
        run.close_activity()
        self._finish("cancelled")

    def stop(self, timeout: float = 10.0) -> bool:
        """Cancel the running task and wait for its thread to end (for closing); True when it ended."""
        ok = True
        for run in self._runs:
            ok = run.stop(timeout) and ok
        return ok

    def wait(self, timeout_ms: int = 60000) -> None:
        """Block (processing Qt events) until the current task has finished; for scripts and tests."""
        from qtpy.QtCore import QCoreApplication, QElapsedTimer

        timer = QElapsedTimer()
        timer.start()
        while self.running:
            if timer.elapsed() > timeout_ms:
                raise TimeoutError(f"task still running after {timeout_ms} ms")
            QCoreApplication.processEvents()

    # -- GUI-thread slots ---------------------------------------------------------

    def _on_progress(self, p: Progress) -> None:
        self._last_progress = p
        if p.total:
            value, maximum = _bar_range(p.step, p.total)
            self.bar.setRange(0, maximum)
            self.bar.setValue(value)
            self.bar.setFormat(f"{p.stage}: %v/%m" if maximum == p.total else f"{p.stage}: %p%")
        else:
            self.bar.setRange(0, 0)
        if p.message:
            self.status.setText(p.message)
        run = self._run
        if run is not None and run.activity is not None:
            self._activity_later(run)

    def _activity_later(self, run: "_Run") -> None:
        """Schedule one update of the activity-dock bar (at most every ACTIVITY_INTERVAL_MS).

        napari's bar processes Qt events while it redraws, so it is never updated from
        inside a progress slot: that nested further progress slots without bound.
        """
        if run.activity_pending:
            return
        from qtpy.QtCore import QTimer

        run.activity_pending = True
        alive = self._alive
        QTimer.singleShot(ACTIVITY_INTERVAL_MS, lambda: alive["yes"] and self._flush_activity(run))

    def _flush_activity(self, run: "_Run") -> None:
        run.activity_pending = False
        p = self._last_progress
        if run is not self._run or run.activity is None or p is None:
            return
        if run.showing:  # inside an update already: try again later
            self._activity_later(run)
            return
        run.showing = True
        try:
            self._show_activity(run, p)
        finally:
            run.showing = False

    def _show_activity(self, run: "_Run", p: Progress) -> None:
        """Mirror a progress event in the run's activity-dock bar (only what changed).

        The run may end inside this call (napari processes events while redrawing):
        the bar is looked up again after each step.
        """
        bar = run.activity
        value, maximum = _bar_range(p.step, p.total) if p.total else (0, 0)
        description = f"{self._label}: {p.stage}" if p.stage else self._label
        if run.activity_desc != description:
            run.activity_desc = description
            bar.set_description(description)
            if run.activity is not bar:
                return
        if bar.total != maximum:
            bar.total = maximum
        if run.activity is bar and bar.n != value:
            bar.n = value
            bar.update(0)

    def _finish(self, outcome: str, result: Any = None, on_done: Optional[Callable] = None) -> None:
        try:
            if outcome == "done" and on_done is not None:
                steps = on_done(result)
                if inspect.isgenerator(steps):  # one layer update per event-loop turn
                    self._step(steps)
                    return
        except Exception as exc:  # a failure while updating layers is an error of the run
            outcome = "error"
            self._report(exc)
        self._complete(outcome)

    def _step(self, steps) -> None:
        """Run ``on_done``'s next step, then let the event loop draw and react before the one after."""
        from qtpy.QtCore import QTimer

        alive = self._alive

        def turn() -> None:
            if not alive["yes"]:
                steps.close()
                return
            try:
                next(steps)
            except StopIteration:
                self._complete("done")
                return
            except Exception as exc:  # a failure while updating layers is an error of the run
                self._report(exc)
                self._complete("error")
                return
            QTimer.singleShot(0, turn)

        turn()

    def _complete(self, outcome: str) -> None:
        if self._run is not None:
            self._run.close_activity()
        self.worker = None
        self.cancel_button.setEnabled(False)
        self.bar.setRange(0, 1)
        self.bar.setValue(1 if outcome == "done" else 0)
        self.bar.setFormat("%p%")
        if outcome == "done":
            self.status.setText("Done")
        elif outcome == "cancelled":
            text = getattr(self, "_cancelled_text", None)
            self.status.setText(text(getattr(self, "_last_progress", None)) if text else
                                "Cancelled: nothing was changed")
        self.busy.emit(False)
        self.finished.emit(outcome)

    def _on_error(self, exc: BaseException) -> None:
        if isinstance(exc, Cancelled):
            self._finish("cancelled")
            return
        self._report(exc)
        self._finish("error")

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        self.stop()
        super().closeEvent(event)

    def _report(self, exc: BaseException) -> None:
        """Show an error as one line; a message's further lines (details) go to the tooltip."""
        self.last_error = exc
        full = str(exc).strip() or type(exc).__name__
        msg = full.splitlines()[0]
        self.status.setText(f"Error: {msg}")
        self.status.setToolTip(full if full != msg else "")
        if not isinstance(exc, (ValueError, TypeError, FileNotFoundError, FileExistsError)):
            traceback.print_exception(type(exc), exc, exc.__traceback__)
        show_error(msg)


class _Alive:
    """``alive["yes"]``: whether a widget's Qt object still exists (a closed viewer deletes its docks).

    Signals of a worker may arrive after napari deleted the widget; its slots check this first.
    The widget is held weakly, so this never keeps it alive.
    """

    def __init__(self, widget: QWidget) -> None:
        import weakref

        self._ref = weakref.ref(widget)

    def __getitem__(self, key: str) -> bool:
        widget = self._ref()
        return widget is not None and not _deleted(widget)


def _deleted(obj) -> bool:
    """Whether the C++ side of a Qt object is gone (PyQt's sip or PySide's shiboken)."""
    try:
        from qtpy import sip

        return sip.isdeleted(obj)
    except ImportError:
        import shiboken6

        return not shiboken6.isValid(obj)
