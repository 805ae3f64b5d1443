"""One way to run long work from a widget: off the GUI thread, with progress and Cancel.

``TaskRunner`` is a small panel (status text, progress bar, Cancel button) that
runs one core function at a time in a napari worker thread. The function gets a
:data:`cellsynth.progress.ProgressCallback`; progress events are shown in the bar,
and Cancel makes the next callback raise :class:`cellsynth.progress.Cancelled`.
``on_done(result)`` runs on the GUI thread after the worker returns; it is the
only place where layers are added or updated, so a cancelled or failed run
leaves the viewer as it was.
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, Optional

from napari.qt.threading import create_worker
from napari.utils.notifications import show_error
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from ..progress import Cancelled, Progress

__all__ = ["TaskRunner", "avoid_llvm_clash"]


def avoid_llvm_clash() -> bool:
    """Keep triton from loading next to Mesa's software OpenGL; return True when it was blocked.

    torch's compiler stack imports triton, whose bundled LLVM crashes the process
    when Mesa's llvmpipe (software OpenGL, as on remote desktops and under Xvfb)
    is already loaded. Nothing in cellsynth uses triton, so before the first heavy
    import it is marked as absent, which torch, diffusers, transformers and timm
    all handle as "triton not installed".
    """
    if "triton" in sys.modules:
        return False
    try:
        with open("/proc/self/maps") as fh:
            maps = fh.read()
    except OSError:
        return False
    if "libLLVM" not in maps:
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]
    return True


class _Bridge(QObject):
    """Lives on the GUI thread; signals emitted from the worker arrive queued."""

    progress = Signal(object)


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
        self._cancel = threading.Event()
        self.worker = None
        self.last_error: Optional[BaseException] = None

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
    ) -> None:
        """Run ``fn(progress=callback)`` in a worker thread; then ``on_done(result)`` on the GUI thread.

        Raises
        ------
        RuntimeError
            If another task of this runner is still running.
        """
        if self.running:
            raise RuntimeError("a task is already running; wait for it or press Cancel")
        avoid_llvm_clash()
        self._cancel.clear()
        self.last_error = None
        cancel, bridge = self._cancel, self._bridge

        def callback(p: Progress) -> None:
            if cancel.is_set():
                raise Cancelled()
            bridge.progress.emit(p)

        def work():
            result = fn(progress=callback)
            if cancel.is_set():
                raise Cancelled()
            return result

        self.status.setText(f"{label}…")
        self.bar.setRange(0, 0)  # busy until the first progress event
        self.cancel_button.setEnabled(True)
        self.busy.emit(True)
        worker = create_worker(work, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(lambda result: self._finish("done", result, on_done))
        worker.errored.connect(self._on_error)
        self.worker = worker
        worker.start()

    def cancel(self) -> None:
        """Ask the running task to stop at its next progress step."""
        if self.running:
            self._cancel.set()
            self.status.setText("Cancelling…")
            self.cancel_button.setEnabled(False)

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
        if p.total:
            self.bar.setRange(0, int(p.total))
            self.bar.setValue(int(min(p.step, p.total)))
            self.bar.setFormat(f"{p.stage}: %v/%m")
        else:
            self.bar.setRange(0, 0)
        if p.message:
            self.status.setText(p.message)

    def _finish(self, outcome: str, result: Any = None, on_done: Optional[Callable] = None) -> None:
        try:
            if outcome == "done" and on_done is not None:
                on_done(result)
        except Exception as exc:  # a failure while updating layers is an error of the run
            outcome = "error"
            self._report(exc)
        self.worker = None
        self.cancel_button.setEnabled(False)
        self.bar.setRange(0, 1)
        self.bar.setValue(1 if outcome == "done" else 0)
        self.bar.setFormat("%p%")
        if outcome == "done":
            self.status.setText("Done")
        elif outcome == "cancelled":
            self.status.setText("Cancelled: nothing was changed")
        self.busy.emit(False)
        self.finished.emit(outcome)

    def _on_error(self, exc: BaseException) -> None:
        if isinstance(exc, Cancelled):
            self._finish("cancelled")
            return
        self._report(exc)
        self._finish("error")

    def _report(self, exc: BaseException) -> None:
        self.last_error = exc
        msg = str(exc) or type(exc).__name__
        self.status.setText(f"Error: {msg}")
        if not isinstance(exc, (ValueError, TypeError, FileNotFoundError, FileExistsError)):
            traceback.print_exception(type(exc), exc, exc.__traceback__)
        show_error(msg)
