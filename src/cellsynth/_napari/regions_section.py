"""Count cells: cells per region of interest drawn in a Shapes layer, as a table with Export CSV.

Rectangles, ellipses and polygons of the chosen Shapes layer are the regions
(:mod:`cellsynth.count.regions`, with its border rule); the table gives each
region's count, area and density (cells per mm² when the image layer has a
physical scale, taken as micrometres per pixel; per megapixel otherwise) and
follows at once when a region is drawn, moved or deleted and when a point is
added or deleted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from magicgui.widgets import ComboBox, Container
from napari.layers import Shapes
from qtpy.QtWidgets import (QAbstractItemView, QHBoxLayout, QLabel, QPushButton, QTableWidget, QTableWidgetItem,
                            QVBoxLayout, QWidget)

from ._counting import plane_shape

__all__ = ["RegionsSection", "layer_regions"]


def layer_regions(shapes: Shapes, image) -> list:
    """The areas of a Shapes layer as :class:`~cellsynth.count.regions.Region` in ``image``'s pixel coordinates.

    Lines and paths are left out (they hold no area).
    """
    from ..count.regions import REGION_KINDS, Region

    s_scale, s_translate = np.asarray(shapes.scale[-2:], float), np.asarray(shapes.translate[-2:], float)
    i_scale, i_translate = np.asarray(image.scale[-2:], float), np.asarray(image.translate[-2:], float)
    out = []
    for k, (kind, verts) in enumerate(zip(shapes.shape_type, shapes.data)):
        if kind not in REGION_KINDS or len(verts) < 3:
            continue
        world = np.asarray(verts, float)[:, -2:] * s_scale + s_translate
        out.append(Region(f"region {k + 1}", kind, (world - i_translate) / i_scale))
    return out


class RegionsSection(QWidget):
    """The "cells per region" section of the Count cells dock."""

    def __init__(self, dock) -> None:
        super().__init__()
        self.dock = dock
        self.viewer = dock.viewer
        self.rows: list[dict] = []
        self._watched: set[int] = set()
        self.shapes = ComboBox(label="regions", choices=self._choices, nullable=True,
                               tooltip="a Shapes layer of rectangles, ellipses or polygons: the cells of each are "
                                       "counted (a cell belongs to a region when the pixel of its centre does)")
        self.table = QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(["region", "cells", "area", "density"])
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.setMinimumHeight(110)
        self.note = QLabel("")
        self.note.setWordWrap(True)
        self.export_button = QPushButton("Export CSV")
        self.export_button.clicked.connect(lambda: self.export())
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.export_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(Container(widgets=[self.shapes]).native)
        layout.addWidget(self.table)
        layout.addWidget(self.note)
        layout.addLayout(buttons)
        self.shapes.changed.connect(lambda _value=None: self.update())
        for ev in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            ev.connect(self.shapes.reset_choices)
        self._show(False)

    def _choices(self, *_) -> list:
        return [layer for layer in self.viewer.layers if isinstance(layer, Shapes)]

    def _show(self, on: bool) -> None:
        for w in (self.table, self.note, self.export_button):
            w.setVisible(on)

    def _watch(self, layer) -> None:
        if layer is not None and id(layer) not in self._watched:
            layer.events.data.connect(lambda _event=None: self.update())
            self._watched.add(id(layer))

    def update(self) -> list[dict]:
        """Recount the cells per region (nothing to do without regions or a count); returns the rows."""
        from ..count.regions import count_in_regions, point_regions

        shapes, image, points = self.shapes.value, self.dock.image.value, self.dock._points_layer()
        self.rows = []
        if shapes is None or image is None or points is None:
            self._show(False)
            return self.rows
        self._watch(shapes)
        self._watch(points)
        plane = plane_shape(image)
        scale = float(np.mean(np.abs(image.scale[-2:])))
        physical = not np.allclose(image.scale[-2:], 1.0)
        try:
            regions = layer_regions(shapes, image)
            pixels = (np.asarray(points.data, float)[:, -2:] * np.asarray(points.scale[-2:], float)
                      + np.asarray(points.translate[-2:], float) - np.asarray(image.translate[-2:], float)) \
                / np.asarray(image.scale[-2:], float)
            self.rows = count_in_regions(pixels, regions, plane, pixel_size=scale if physical else None)
            _label_points(points, point_regions(pixels, regions, plane))
        except ValueError as exc:
            self.note.setText(str(exc))
            self.table.setRowCount(0)
            self._show(True)
            return self.rows
        self.table.setRowCount(len(self.rows))
        for i, r in enumerate(self.rows):
            area = f"{r['area_um2']:g} µm²" if "area_um2" in r else f"{r['area_px']} px"
            density = f"{r['per_mm2']:g} /mm²" if "per_mm2" in r else f"{r['per_megapixel']:g} /Mpx"
            for j, text in enumerate((r["region"], str(r["count"]), area, density)):
                self.table.setItem(i, j, QTableWidgetItem(text))
        unit = "the layer's scale as µm per pixel" if physical else "no physical scale: per megapixel"
        self.note.setText(f"{len(self.rows)} regions of '{shapes.name}' ({unit}); a cell counts in a region when "
                          "the pixel of its centre lies in it")
        self._show(True)
        return self.rows

    def export(self, path: Optional[str] = None) -> Optional[Path]:
        """Write the table as CSV (asks where when ``path`` is None); never replaces a file without asking."""
        from .frame_table import export_csv

        columns = list(dict.fromkeys(k for r in self.rows for k in r))
        return export_csv(self, columns, [[r.get(c, "") for c in columns] for r in self.rows], path=path,
                          what="cells per region", name="regions.csv", layer=self.dock._points_layer())


def _label_points(points, names: list[str]) -> None:
    """Each point's regions as the ``region`` feature (saved with the layer: File > Save Selected Layers)."""
    if len(names) != len(points.data):
        return
    current = points.features.get("region") if "region" in points.features else None
    if current is not None and list(current) == list(names):
        return
    features = points.features.copy()
    features["region"] = names
    points.features = features
