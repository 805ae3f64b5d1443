"""Count cells: count a whole folder of images, as ``cellsynth count-batch`` does, and open any of them.

The section runs :func:`cellsynth.batch.count_batch` on the chosen folder with
the dock's model, diameter and device, on a local cluster, with the dock's
progress bar and Cancel; the results folder is the command's (``counts.csv``,
``counts.png``, ``points/``), so a cancelled or interrupted run resumes where it
stopped when run again. The table shows one row per counted plane; a click opens
that image with its points.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from magicgui.widgets import Container, FileEdit, PushButton
from napari.utils.notifications import show_error, show_info
from qtpy.QtGui import QPixmap
from qtpy.QtWidgets import QAbstractItemView, QLabel, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget

__all__ = ["FolderSection", "RESULTS_NAME"]

#: The results folder made beside the images when none is chosen.
RESULTS_NAME = "cellsynth-counts"


class FolderSection(QWidget):
    """The "count a folder" section of the Count cells dock."""

    def __init__(self, dock) -> None:
        super().__init__()
        self.dock = dock
        self.viewer = dock.viewer
        self.rows: list[dict] = []
        self.out: Optional[Path] = None
        self.folder = FileEdit(label="folder", mode="d", tooltip="every TIFF, OME-Zarr, PNG and JPEG image in it "
                                                                  "(and its subfolders) is counted")
        self.results = FileEdit(label="results", mode="d", value="",
                                tooltip=f"where counts.csv, counts.png and points/ go (default: {RESULTS_NAME} in "
                                        "the folder); a run stopped part-way resumes there")
        self.count_button = PushButton(text="Count folder")
        self.workers: Optional[int] = None  # local cluster workers (None: as the machine allows)
        self.count_button.changed.connect(lambda *_: self.run())
        self.title = QLabel("")
        self.title.setWordWrap(True)
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["image", "plane", "count"])
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.verticalHeader().setVisible(False)
        self.table.setMinimumHeight(110)
        self.table.cellClicked.connect(lambda row, _col: self.open_row(row))
        self.plot = QLabel("")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        heading = QLabel("<b>Count every image of a folder</b> (model, diameter and device as above)")
        heading.setWordWrap(True)
        layout.addWidget(heading)
        layout.addWidget(Container(widgets=[self.folder, self.results, self.count_button]).native)
        layout.addWidget(self.title)
        layout.addWidget(self.table)
        layout.addWidget(self.plot)
        self._show(False)

    def _show(self, on: bool) -> None:
        for w in (self.title, self.table, self.plot):
            w.setVisible(on)

    def _paths(self) -> Optional[tuple[Path, Path]]:
        folder = Path(str(self.folder.value)) if str(self.folder.value) not in ("", ".") else None
        if folder is None or not folder.is_dir():
            show_error("Choose a folder of images to count")
            return None
        out = str(self.results.value)
        return folder, (Path(out) if out not in ("", ".") else folder / RESULTS_NAME)

    def run(self) -> None:
        """Count every image of the folder with the dock's settings (resuming earlier results there)."""
        paths = self._paths()
        if paths is None or self.dock.runner.running:
            return
        folder, out = paths
        model = self.dock.model.value if self.dock.model.value != "file" else str(self.dock.model_file.value)
        diameter, workers = self.dock.diameter.arg(), self.workers

        def work(progress):
            from ..batch import BatchParams, count_batch

            params = BatchParams(model=model, diameter=diameter, device=self.dock.device.value)
            return count_batch(folder, out, params=params, workers=workers, progress=progress)

        self.dock.runner.start(work, on_done=lambda res: self.show_result(res, out),
                               label=f"Counting the images of {folder.name}")

    def show_result(self, res, out: Path) -> None:
        """The table and the plot of a finished run."""
        self.out, self.rows = Path(out), list(res.rows)
        self.table.setRowCount(len(self.rows))
        for i, r in enumerate(self.rows):
            for j, text in enumerate((Path(r["image"]).name, str(r["plane"]), str(r["count"]))):
                self.table.setItem(i, j, QTableWidgetItem(text))
        total = sum(int(round(float(r["count"]))) for r in self.rows)
        errors = f"; {len(res.errors)} could not be counted: {res.errors[0]}" if res.errors else ""
        self.title.setText(f"{len(self.rows)} planes, {total} cells ({res.counted} counted now, {res.skipped} "
                           f"kept from before) in {res.table}{errors}. Click a row to open the image with its points.")
        pix = QPixmap(str(res.plot)) if res.plot is not None and Path(res.plot).is_file() else QPixmap()
        self.plot.setPixmap(pix.scaledToWidth(320) if not pix.isNull() else pix)
        self._show(True)

    def open_row(self, row: int) -> None:
        """Open the image of table row ``row`` with its points (the results' CSV, read by the plugin's reader)."""
        if not 0 <= row < len(self.rows) or self.out is None:
            return
        r = self.rows[row]
        image, points = Path(r["image"]), self.out / r["points_csv"]
        try:
            self.viewer.open(str(image))
            self.viewer.open(str(points), plugin="napari-cellsynth")
        except Exception as exc:  # an image moved or unreadable since it was counted
            show_error(f"Could not open {image.name} with its points: {exc}")
            return
        show_info(f"Opened {image.name} with {r['count']} points")
