"""Counts per frame in the "Count cells" dock, and counting of dask-backed or multiscale layers without a full load.

:class:`FrameTable` is a section of the dock shown after counting a stack or a
time-lapse: one row per frame (its index, count and the diameter used), a plot
of the count over frames, and Export CSV. Clicking a row moves the viewer to
that frame. :func:`lazy_count_work` counts a dask-backed or multiscale layer
with :func:`cellsynth.batch.lazy.count_planes` (plane by plane, large planes in
chunks), with progress, never loading the whole layer.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Optional

import numpy as np
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import (QAbstractItemView, QFileDialog, QHBoxLayout, QLabel, QPushButton, QTableWidget,
                            QTableWidgetItem, QVBoxLayout, QWidget)

__all__ = ["FrameTable", "estimate_input", "is_lazy", "layer_pixels", "lazy_count_work",
           "show_frame_table"]

def is_lazy(data: Any) -> bool:
    """True for array-likes that are not in memory (dask, zarr): they go through the lazy path."""
    return not isinstance(data, np.ndarray)


def layer_pixels(layer) -> Any:
    """The layer's finest level: an ndarray when it is in memory, else the lazy array as it is (never loaded)."""
    data = layer.data[0] if layer.multiscale else layer.data
    if isinstance(data, np.ndarray):
        return data
    mod = type(data).__module__
    if mod.startswith(("dask", "zarr", "tensorstore")):
        return _as_dask(data)
    return np.asarray(data)


def _as_dask(data):
    import dask.array as da

    return data if isinstance(data, da.Array) else da.from_zarr(data) if type(data).__module__.startswith("zarr") \
        else da.from_array(data, chunks="auto")


def estimate_input(image: Any) -> Any:
    """What to estimate a diameter on (:func:`cellsynth.batch.lazy.diameter_input`)."""
    from ..batch.lazy import diameter_input

    return diameter_input(image)


def lazy_count_work(image: Any, *, model: str, diameter, channel: Optional[int], device: str):
    """The TaskRunner function for a lazy layer: ``(counter, CountResult)`` like ``count_work``'s
    (:func:`cellsynth.batch.lazy.count_planes`)."""

    def work(progress):
        from ..batch.lazy import count_planes
        from ..count import load_counter
        from ..progress import report

        report(progress, "loading the counter", 0, 1)
        counter = load_counter(model, device=device)
        return counter, count_planes(image, counter=counter, diameter=diameter, channel=channel, progress=progress)

    return work


class FrameTable(QWidget):
    """Counts per frame: a table (click a row: the viewer goes to that frame), a plot and Export CSV."""

    def __init__(self, viewer, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self.layer = None
        self.key = "frame"  # the first column: "frame" (one stack) or "image" (several images)
        self.rows: list[dict] = []
        self.title = QLabel("Counts per frame")
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["frame", "count", "diameter (px)"])
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.verticalHeader().setVisible(False)
        self.table.setMinimumHeight(140)
        self.table.cellClicked.connect(lambda row, _col: self.go_to(row))
        self.export_button = QPushButton("Export CSV")
        self.export_button.clicked.connect(lambda: self.export())
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(3.2, 1.8), dpi=100)
        self.axes = self.figure.add_subplot()
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(150)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.export_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.title)
        layout.addWidget(self.table)
        layout.addWidget(self.canvas)
        layout.addLayout(buttons)

    def set_result(self, layer, result) -> None:
        """Show the per-frame counts of ``result`` (counted on the image layer ``layer``)."""
        self.key, self.layer = "frame", layer
        self.table.setHorizontalHeaderLabels(["frame", "count", "diameter (px)"])
        self.canvas.setVisible(True)
        per = np.asarray(result.per_plane, float)
        lead = per.shape if per.ndim and result.meta.get("n_planes", per.size) > 1 else ()
        d = result.meta.get("diameter_used")
        self.rows = [{"frame": " ".join(map(str, idx)) if len(idx) > 1 else int(idx[0]), "index": idx,
                      "count": float(per[idx]), "diameter": None if d is None else round(float(d), 2)}
                     for idx in (np.ndindex(*lead) if lead else [])]
        self.table.setRowCount(len(self.rows))
        for i, r in enumerate(self.rows):
            count = f"{r['count']:.2f}" if result.meta.get("kind") == "regression" else f"{int(r['count'])}"
            for j, text in enumerate((str(r["frame"]), count, "" if r["diameter"] is None else f"{r['diameter']:g}")):
                self.table.setItem(i, j, QTableWidgetItem(text))
        self.title.setText(f"Counts per frame: {len(self.rows)} frames of {layer.name}, "
                           f"{int(round(sum(r['count'] for r in self.rows)))} cells")
        self.setVisible(bool(self.rows))
        if not self.rows:  # one plane: nothing to plot (drawing the figure costs the GUI thread ~0.1 s)
            return
        self.axes.clear()
        counts = [r["count"] for r in self.rows]
        self.axes.plot(range(len(self.rows)), counts, marker=".", color="tab:blue")
        self.axes.set_ylim(0, max(1.0, max(counts)) * 1.1)  # from zero: a change of one cell looks like one
        self.axes.set_xlabel("frame", fontsize="small")
        self.axes.set_ylabel("cells", fontsize="small")
        self.axes.tick_params(labelsize="x-small")
        self.figure.tight_layout()
        self.canvas.draw_idle()

    def set_images(self, rows: list[dict]) -> None:
        """Show one row per image (``image``, ``count``, ``diameter``): the counts of several open images.

        A click on a row selects that image's result layer; the plot is hidden.
        """
        self.key, self.layer = "image", None
        self.rows = [dict(r) for r in rows]
        self.table.setHorizontalHeaderLabels(["image", "count", "diameter (px)"])
        self.table.setRowCount(len(self.rows))
        for i, r in enumerate(self.rows):
            d = r.get("diameter")
            for j, text in enumerate((str(r["image"]), str(int(r["count"])), "" if d is None else f"{d:.3g}")):
                self.table.setItem(i, j, QTableWidgetItem(text))
        total = int(sum(r["count"] for r in self.rows))
        self.title.setText(f"Counts per image: {len(self.rows)} images, {total} cells")
        self.canvas.setVisible(False)
        self.setVisible(bool(self.rows))

    def go_to(self, row: int) -> None:
        """Move the viewer's sliders to the frame of table row ``row`` (or select the row's image result)."""
        if not 0 <= row < len(self.rows):
            return
        if self.key == "image":
            from ._counting import result_name

            name = result_name(self.rows[row]["image"])
            if name in self.viewer.layers:
                self.viewer.layers.selection.active = self.viewer.layers[name]
            return
        if self.layer is None:
            return
        idx = self.rows[row]["index"]
        offset = self.viewer.dims.ndim - self.layer.ndim
        world = np.asarray(self.layer.data_to_world(list(idx) + [0] * (self.layer.ndim - len(idx))), float)
        for axis, value in enumerate(world[: len(idx)]):
            self.viewer.dims.set_point(offset + axis, float(value))

    def export(self, path: Optional[str] = None) -> Optional[Path]:
        """Write the table as CSV (asks where when ``path`` is None); never replaces a file without asking."""
        rows = [[r[self.key], r["count"] if r["count"] % 1 else int(r["count"]),
                 "" if r["diameter"] is None else r["diameter"]] for r in self.rows]
        return export_csv(self, [self.key, "count", "diameter"], rows, path=path, what=f"counts per {self.key}",
                          name=f"{getattr(self.layer, 'name', None) or 'counts'}_counts.csv", layer=self.layer)


def export_csv(parent: QWidget, header: list, rows: list, *, path: Optional[str], what: str,
               name: str, layer=None) -> Optional[Path]:
    """Write a dock's table as CSV, atomically; without ``path`` a dialog asks where (and asks before replacing
    a file), with one an existing file is never replaced. Nothing to write, a cancelled dialog or a failed
    write (said in a notification) give None."""
    if not rows:
        return None
    overwrite = path is None
    if path is None:
        path, _ = QFileDialog.getSaveFileName(parent, f"Export {what}", name, "CSV (*.csv)")
        if not path:
            return None
    from ..io import atomic_path

    try:
        with atomic_path(path, overwrite=overwrite) as tmp:
            with open(tmp, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(header)
                w.writerows(rows)
    except (OSError, FileExistsError) as exc:
        show_error(f"Could not export the table: {exc}")
        return None
    from .points_io import layer_record  # what made the table: the counted layer's record

    layer_record(path, getattr(layer, "metadata", None) or {}, scale=getattr(layer, "scale", None),
                 operation=f"export {what}")
    show_info(f"{what[0].upper()}{what[1:]} written to {path}")
    return Path(path)


def show_frame_table(widget: QWidget, layer, result) -> Optional[FrameTable]:
    """Show (or hide, for one plane) the per-frame section in ``widget``'s dock, created on first use."""
    table = getattr(widget, "frame_table", None)
    if table is None:
        table = FrameTable(widget.viewer)
        lay = widget.layout()
        lay.insertWidget(max(0, lay.count() - 1), table)  # above the closing stretch
        widget.frame_table = table
    table.set_result(layer, result)
    return table
