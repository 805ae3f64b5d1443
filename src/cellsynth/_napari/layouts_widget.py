"""Dock widget "Cell layouts": generate, draw by hand, export datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from magicgui.widgets import CheckBox, Container, FileEdit, PushButton, SpinBox
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QLabel, QWidget
from superqt import QCollapsible

from ..layouts import CELL_COLUMNS, LayoutParams, export_dataset, generate_layout, render_layout
from ..layouts.dataset import append_layout
from ._layers import provenance, real_viewer, upsert_layer
from ._params import ParamsForm
from ._tasks import TaskRunner, dock_layout

__all__ = ["LayoutsWidget", "IMAGE", "LABELS", "CENTRES", "ELLIPSES", "ellipse_cells"]

IMAGE, LABELS, CENTRES, ELLIPSES = "layout", "layout cells", "layout centres", "layout ellipses"
_FEATURES = [c for c in CELL_COLUMNS if c not in ("label", "row", "col")]


def export_cancelled_text(last, n: int, folder) -> str:
    """What a cancelled export left in ``folder``: the items its manifest lists (else the last progress event)."""
    from ..io import read_json

    done = int(last.step) if last is not None and last.stage == "layouts" else 0
    try:
        done = len(read_json(Path(folder) / "manifest.json")["items"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if done == 0:
        return f"Cancelled: no layout was written to {folder}"
    return (f"Cancelled: {done} of {n} layouts are written in {folder} (each complete, with the manifest); "
            "export again with the same settings to resume")


class LayoutsWidget(QWidget):
    """Generate Syn-HC layouts, edit them by hand, export datasets.

    Generate adds (or updates) the Image "layout", the Labels "layout cells"
    and the Points "layout centres" (features: per-cell axes, angle,
    intensity). In draw mode, adding, moving or deleting centre points, and
    drawing, reshaping or deleting ellipses in the Shapes layer "layout
    ellipses", re-renders image and labels (debounced) with the same look:
    the shown layout's background, noise, contrast and brightness are kept,
    so only the pixels of the edited cells change. "Add shown layout to
    dataset" appends the shown layout (drawn or edited) to a dataset folder.
    """

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = real_viewer(napari_viewer)
        self.form = ParamsForm(LayoutParams, key="layouts")
        self.seed = SpinBox(value=0, min=0, max=2**31 - 1, label="seed")
        self.generate_button = PushButton(text="Generate")
        self.next_button = PushButton(text="Next seed")
        self.draw = CheckBox(value=False, text="Draw mode (click to add cells, select + Delete to remove)")
        self.folder = FileEdit(mode="d", label="export folder")
        self.n_export = SpinBox(value=100, min=1, max=1_000_000, label="number of layouts")
        self.overwrite = CheckBox(value=False, text="replace a different dataset in that folder")
        self.export_button = PushButton(text="Export dataset")
        self.add_button = PushButton(text="Add shown layout to dataset",
                                     tooltip="Append the layout on screen (drawn or edited by hand) as the next item "
                                     "of a dataset of drawn layouts in the export folder; earlier items are kept")
        self.count_label = QLabel("No layout yet")
        self.runner = TaskRunner()
        self._render_timer = QTimer(self)
        self._render_timer.setSingleShot(True)
        self._render_timer.setInterval(150)
        self._render_timer.timeout.connect(self.render_from_points)
        self._updating = False
        self._watched = None
        self._shown = None  # (layout, params, seed) on screen; its look is kept while drawing
        self._defaults_set = None  # (points layer, feature defaults) last set

        params_box = QCollapsible("Parameters")
        params_box.addWidget(self.form.native)
        controls = Container(widgets=[self.seed, self.generate_button, self.next_button, self.draw])
        export = Container(widgets=[self.folder, self.n_export, self.overwrite, self.export_button, self.add_button])
        layout = dock_layout(self, self.runner)
        layout.addWidget(params_box)
        layout.addWidget(controls.native)
        layout.addWidget(self.count_label)
        layout.addWidget(QLabel("<b>Dataset</b>"))
        layout.addWidget(export.native)
        layout.addStretch(1)

        self.generate_button.changed.connect(self.generate)
        self.next_button.changed.connect(self._next_seed)
        self.export_button.changed.connect(self.export)
        self.add_button.changed.connect(lambda _value=None: self.add_to_dataset())
        self.draw.changed.connect(self._on_draw_toggled)
        self.runner.busy.connect(self._set_busy)

    # -- actions -----------------------------------------------------------------

    def _params(self) -> Optional[LayoutParams]:
        try:
            return self.form.params()
        except ValueError as exc:
            show_error(f"Layout parameters: {exc}")
            self.runner.status.setText(f"Error: {exc}")
            return None

    def generate(self) -> None:
        """Generate one layout with the form's parameters and seed."""
        params = self._params()
        if params is None or self.runner.running:
            return
        seed = int(self.seed.value)
        self.form.save()
        self.runner.start(
            lambda progress: generate_layout(params, rng=seed),
            on_done=lambda lay: self._show_steps(lay, params, seed, "layouts.generate"),
            label="Generating layout",
        )

    def _next_seed(self) -> None:
        self.seed.value = int(self.seed.value) + 1
        self.generate()

    def export(self) -> None:
        """Write a dataset of N layouts to the chosen folder, with progress and Cancel."""
        params = self._params()
        if params is None or self.runner.running:
            return
        folder = self.folder.value
        if not str(folder) or str(folder) == ".":
            show_error("Choose an export folder first")
            return
        n, seed, overwrite = int(self.n_export.value), int(self.seed.value), bool(self.overwrite.value)
        self.form.save()
        self.runner.start(
            lambda progress: export_dataset(folder, n, params=params, seed=seed, overwrite=overwrite, progress=progress),
            on_done=lambda path: show_info(f"Wrote {n} layouts to {path.parent}"),
            label=f"Exporting {n} layouts",
            cancelled_text=lambda last: export_cancelled_text(last, n, folder),
        )

    def add_to_dataset(self) -> None:
        """Append the layout on screen to the dataset of drawn layouts in the export folder (never replaces items)."""
        if self.runner.running:
            return
        if self._render_timer.isActive():  # an edit not rendered yet
            self._render_timer.stop()
            self.render_from_points()
        folder = self.folder.value
        if self._shown is None or IMAGE not in self.viewer.layers:
            show_error("Generate or draw a layout first")
            return
        if not str(folder) or str(folder) == ".":
            show_error("Choose an export folder first")
            return
        lay, params, seed = self._shown
        overwrite = bool(self.overwrite.value)

        def done(path) -> None:
            from ..io import read_json

            n = len(read_json(path)["items"])
            self.count_label.setText(f"Cells: {lay.n_cells}; added as layout {n} of {path.parent}")
            show_info(f"Added the layout ({lay.n_cells} cells) to {path.parent}; it holds {n}")

        self.runner.start(lambda progress: append_layout(folder, lay, params=params, seed=seed, overwrite=overwrite),
                          on_done=done, label="Adding the layout to the dataset")

    def render_from_points(self) -> None:
        """Re-render image and labels from the centre points (with their features) and the drawn ellipses."""
        if CENTRES not in self.viewer.layers:
            return
        params = self._params()
        if params is None:
            return
        pts = self.viewer.layers[CENTRES]
        data = np.asarray(pts.data, dtype=float).reshape(-1, 2)
        cells = {"row": data[:, 0], "col": data[:, 1]}
        feats = pts.features
        for col in _FEATURES:
            cells[col] = np.full(len(data), _default(col, params))
            if col in feats and len(feats) == len(data):
                cells[col] = np.nan_to_num(feats[col].to_numpy(dtype=float), nan=_default(col, params))
        if ELLIPSES in self.viewer.layers:
            drawn = ellipse_cells(self.viewer.layers[ELLIPSES], default_intensity=_default("intensity", params))
            cells = {k: np.concatenate([cells[k], drawn[k]]) for k in cells}
        look, seed = None, int(self.seed.value)
        if self._shown is not None:
            look, seed = self._shown[0].appearance, self._shown[2]
        lay = render_layout(cells, params=params, rng=seed, appearance=look)
        self._show(lay, params, seed, "layouts.draw", points=False)

    # -- layers ------------------------------------------------------------------

    def _show(self, lay, params: LayoutParams, seed: int, operation: str, points: bool = True) -> None:
        for _ in self._show_steps(lay, params, seed, operation, points):
            pass

    def _show_steps(self, lay, params: LayoutParams, seed: int, operation: str, points: bool = True):
        """Add or update the layout's layers, one per step (a TaskRunner gives each its own event-loop turn)."""
        meta = provenance(operation, params=params.to_dict(), seed=seed, n_cells=lay.n_cells)
        self._shown = (lay, params, seed)
        self._updating = True
        try:
            upsert_layer(self.viewer, IMAGE, "image", lay.image, metadata=meta, colormap="gray",
                         contrast_limits=(0, 255))
            yield
            labels = upsert_layer(self.viewer, LABELS, "labels", lay.labels, metadata=meta, opacity=0.7)
            if labels.contour != 1:  # each set redraws the layer: only when it changes
                labels.contour = 1  # outlines, so the image stays visible
            yield
            if points:
                feats = {c: lay.cells[c] for c in _FEATURES}
                layer = upsert_layer(self.viewer, CENTRES, "points", lay.centres, metadata=meta, features=feats,
                                     size=max(3.0, params.cell_size / 3), face_color="yellow", border_width=0)
                defaults = {c: _default(c, params) for c in _FEATURES}
                if self._defaults_set != (layer, defaults):  # each set re-derives the features table
                    layer.feature_defaults = defaults
                    self._defaults_set = (layer, defaults)
                self._watch(layer)
        finally:
            self._updating = False
        self.count_label.setText(f"Cells: {lay.n_cells}")

    def _watch(self, layer) -> None:
        if self._watched is not layer:
            layer.events.data.connect(self._on_points_edited)
            self._watched = layer
        if self.draw.value and layer.mode != "add":
            layer.mode = "add"

    def _on_points_edited(self, event=None) -> None:
        if self._updating or not self.draw.value:
            return
        action = getattr(event, "action", None)
        if str(getattr(action, "value", action)) in ("adding", "removing", "changing"):
            return  # these precede the change itself
        self._render_timer.start()

    def _on_draw_toggled(self, on: bool) -> None:
        if on and CENTRES not in self.viewer.layers:
            params = self._params() or LayoutParams()
            empty = render_layout({"row": [], "col": []}, params=params, rng=int(self.seed.value))
            self._show(empty, params, int(self.seed.value), "layouts.draw")
        if on and ELLIPSES not in self.viewer.layers:
            shapes = self.viewer.add_shapes(name=ELLIPSES, ndim=2, edge_color="cyan", face_color="transparent",
                                            edge_width=1)
            shapes.events.data.connect(self._on_points_edited)
        if CENTRES in self.viewer.layers:
            layer = self.viewer.layers[CENTRES]
            self.viewer.layers.selection.active = layer
            layer.mode = "add" if on else "pan_zoom"

    def _set_busy(self, busy: bool) -> None:
        for w in (self.generate_button, self.next_button, self.export_button, self.add_button):
            w.enabled = not busy


def ellipse_cells(shapes, *, default_intensity: float) -> dict:
    """Cells (centre, semi-axes, angle) of the ellipses of a napari Shapes layer; other shapes are ignored.

    A napari ellipse is stored as the 4 corners of its (possibly rotated) bounding box;
    its first edge gives the ``radius_row`` axis and its angle (see
    :func:`cellsynth.layouts.generate.ellipse_mask`), the second edge ``radius_col``.
    """
    rows = {c: [] for c in ("row", "col", *_FEATURES)}
    for corners, kind in zip(shapes.data, shapes.shape_type):
        if kind != "ellipse":
            continue
        corners = np.asarray(corners, dtype=float)[:, -2:]
        centre = corners.mean(axis=0)
        e1, e2 = corners[1] - corners[0], corners[3] - corners[0]
        for key, value in zip(rows, (centre[0], centre[1], np.hypot(*e1) / 2, np.hypot(*e2) / 2,
                                     np.arctan2(e1[1], e1[0]), default_intensity)):
            rows[key].append(value)
    return {k: np.asarray(v, dtype=float) for k, v in rows.items()}


def _default(col: str, params: LayoutParams) -> float:
    return {"radius_row": params.cell_size / 2, "radius_col": params.cell_size / 2, "angle": 0.0,
            "intensity": float(np.mean(params.intensity))}[col]
