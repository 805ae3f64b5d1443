"""The training and validation curves of an adaptation or retraining, shown in the Counting loop dock.

:class:`TrainingCurves` draws, from the report the run wrote (``adapt_report.json``):
the training loss per step, and for a retraining the errors in the held-out
strip (missed plus extra cells over the annotated cells) at each check, with the
base's value as a dashed line; below, one line with precision, recall and F1 of
the matched points in the strip before and after.
"""

from __future__ import annotations

from typing import Optional

from qtpy.QtWidgets import QLabel, QVBoxLayout, QWidget

__all__ = ["TrainingCurves", "curve_points"]


def curve_points(report: dict) -> dict:
    """The series to draw: ``loss`` ([(step, loss)]), ``validation`` ([(step, error)]), ``base`` (error or None).

    Examples
    --------
    >>> r = {"training": {"loss_curve": [[1, 0.5], [2, 0.4]], "validation": [{"step": 2, "error": 0.1}]},
    ...      "score_before": {"validation": {"error": 0.2}}}
    >>> curve_points(r)
    {'loss': [(1, 0.5), (2, 0.4)], 'validation': [(2, 0.1)], 'base': 0.2}
    """
    training = report.get("training") or {}
    base = ((report.get("score_before") or {}).get("validation") or {}).get("error")
    return {"loss": [(int(s), float(v)) for s, v in training.get("loss_curve") or []],
            "validation": [(int(h["step"]), float(h["error"])) for h in training.get("validation") or []
                           if "error" in h],
            "base": None if base is None else float(base)}


def _matched_line(report: dict) -> str:
    before = (report.get("score_before") or {}).get("validation")
    after = (report.get("score_after") or {}).get("validation")
    if not before or not after or "f1" not in before:
        return ""
    return (f"Held-out strip, {before['n_true']} cells: precision {before['precision']:.2f} → {after['precision']:.2f}, "
            f"recall {before['recall']:.2f} → {after['recall']:.2f}, F1 {before['f1']:.2f} → {after['f1']:.2f} "
            "(base → retrained network)")


class TrainingCurves(QWidget):
    """Loss and held-out error curves of the last adaptation or retraining (hidden until one ran)."""

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.figure = self.canvas = None  # made at the first drawing: opening the dock imports no matplotlib
        self.matched = QLabel("")
        self.matched.setWordWrap(True)
        self._layout = QVBoxLayout(self)
        self._layout.setContentsMargins(0, 0, 0, 0)
        self._layout.addWidget(self.matched)
        self.series: dict = {}
        self.setVisible(False)

    def _figure(self):
        if self.canvas is None:
            from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
            from matplotlib.figure import Figure

            self.figure = Figure(figsize=(3.2, 1.8), dpi=100)
            self.canvas = FigureCanvasQTAgg(self.figure)
            self.canvas.setMinimumHeight(150)
            self._layout.insertWidget(0, self.canvas)
        return self.figure

    def show_report(self, report: dict) -> None:
        """Draw the curves of ``report`` (nothing to draw: hidden)."""
        self.series = curve_points(report if isinstance(report, dict) else {})
        if not self.series["loss"]:
            self.setVisible(False)
            return
        self._figure().clear()
        ax = self.figure.add_subplot(111)
        steps, loss = zip(*self.series["loss"])
        ax.plot(steps, loss, color="tab:blue", lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss", color="tab:blue")
        if self.series["validation"]:
            ax2 = ax.twinx()
            vs, ve = zip(*self.series["validation"])
            ax2.plot(vs, [100 * e for e in ve], "o-", color="tab:orange", lw=1, ms=3)
            if self.series["base"] is not None:
                ax2.axhline(100 * self.series["base"], color="tab:orange", ls="--", lw=1)
            ax2.set_ylabel("held-out errors (%)", color="tab:orange")
            ax2.set_ylim(bottom=0)
        self.figure.tight_layout()
        self.canvas.draw_idle()
        self.matched.setText(_matched_line(report))
        self.setVisible(True)
