"""Dock widget "Count cells": run a counter, show cells as points, click to correct."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, FloatSlider, PushButton, SpinBox
from napari.layers import Image, Points
from napari.utils.notifications import show_error
from qtpy.QtWidgets import QLabel, QWidget

from ..device import device_choices
from ._counting import (LEGEND, DiameterField, apply_threshold, channel_count, count_text, count_work,
                        current_frame, prepare_counter, refresh_count, result_name, show_points, style_as_count)
from ._layers import on_layer_renamed, provenance, real_viewer
from .compare import CompareSection
from .folder_section import FolderSection
from .markers_section import MarkersSection
from .regions_section import RegionsSection
from ._models import recent_models, registry_events
from ._settings import start_with_default_counter
from ._tasks import TaskRunner, dock_layout
from .frame_table import estimate_input, is_lazy, layer_pixels, lazy_count_work, show_frame_table

__all__ = ["CountWidget", "model_choices", "result_name"]

MODELS = ("default", "classic", "file")


def model_choices(*_: Any, with_file: bool = True) -> list:
    """(label, value) pairs: the shipped counters, the counters made here (newest first), a file."""
    made = [(f"{e['name']} ({e.get('kind', 'made here')})", e["path"]) for e in recent_models()]
    out = [("default", "default"), ("classic", "classic")] + made
    return out + [("file", "file")] if with_file else out


class CountWidget(QWidget):
    """Count cells in an image layer with a density model, a regression model or the classic counter.

    The result is a Points layer "<image> cells" with features ``score``,
    ``source`` ("model" or "manual") and ``id``. Click in add mode to add a cell,
    select points and press Delete to remove them: the count shown here follows at
    once. The score threshold hides model points scoring below it (they come back
    when it is lowered). Counting again keeps the points added by hand and does not
    bring back model points deleted by hand. A regression model gives counts per
    256x256 window and no positions; they are shown as a Shapes layer
    "<image> window counts".
    """

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = real_viewer(napari_viewer)
        self.image = ComboBox(label="image", choices=self._image_layers)
        self.model = ComboBox(label="model", choices=model_choices, value="default",
                              tooltip="default: the shipped density counter; classic: seeded watershed in an "
                                      "Otsu mask, no weights; then the counters adapted or retrained here; "
                                      "file: a counter you trained")
        self.model_file = FileEdit(label="model file", mode="r", filter="*.safetensors *.json *.pt *.pth *.zip",
                                   visible=False)
        start_with_default_counter(self.model, self.model_file)
        self.diameter = DiameterField()
        self.estimate_button = PushButton(text="Estimate diameter")
        self.channel = SpinBox(label="channel", value=0, min=0, max=3, visible=False,
                               tooltip="channel to count in RGB or multichannel images")
        self.device = ComboBox(label="device", choices=device_choices(), value="auto")
        self.run_button = PushButton(text="Count")
        self.threshold = FloatSlider(label="score threshold", value=0.0, min=0.0, max=1.0, step=0.01,
                                     tooltip="hide model points scoring below this; points you added stay. A "
                                             "point's score is its peak's height relative to a lone cell's: about "
                                             "1 for a clear nucleus, above 1 for bright or crowded ones, low for "
                                             "faint or doubtful ones (the classic counter: its blob response). "
                                             "The slider runs up to the highest score.")
        self.exclude_border = CheckBox(value=False, text="leave out nuclei cut by the image border",
                                       tooltip="a nucleus whose disk (the diameter used) reaches past the image "
                                               "edge; points you added stay")
        self.count_label = QLabel("No count yet")
        self.count_label.setWordWrap(True)
        self.legend = QLabel(LEGEND)
        self.legend.setWordWrap(True)
        self.runner = TaskRunner()
        self._watched: set[int] = set()
        self._setting_threshold = False

        form = Container(widgets=[self.image, self.model, self.model_file, self.diameter, self.estimate_button,
                                  self.channel, self.device, self.run_button, self.threshold,
                                  self.exclude_border])
        layout = dock_layout(self, self.runner)
        layout.addWidget(form.native)
        layout.addWidget(self.count_label)
        layout.addWidget(self.legend)
        self.compare = CompareSection(self)
        layout.addWidget(self.compare)
        self.regions = RegionsSection(self)
        layout.addWidget(self.regions)
        self.markers = MarkersSection(self)
        layout.addWidget(self.markers)
        self.folder = FolderSection(self)
        layout.addWidget(self.folder)
        layout.addStretch(1)

        self.model.changed.connect(lambda v: setattr(self.model_file, "visible", v == "file"))
        self.run_button.changed.connect(self.run)
        self.estimate_button.changed.connect(self.estimate)
        self.threshold.changed.connect(self._on_threshold)
        self.exclude_border.changed.connect(self._on_border)
        self.image.changed.connect(self._on_image)
        self.runner.busy.connect(lambda b: [setattr(w, "enabled", not b) for w in (self.run_button, self.estimate_button)])
        self.viewer.layers.events.inserted.connect(self.image.reset_choices)
        self.viewer.layers.events.inserted.connect(self._on_layer_added)
        self.viewer.dims.events.current_step.connect(self._on_frame)
        self.viewer.layers.events.removed.connect(self.image.reset_choices)
        on_layer_renamed(self.viewer, self.image.reset_choices)
        self.viewer.layers.events.moved.connect(self.image.reset_choices)
        registry_events.changed.connect(self._models_changed)
        self.destroyed.connect(lambda *_: self._disconnect_registry())
        self._on_image(self.image.value)
        prepare_counter(self.model.value)  # the one-time export, in another process, before the first Count

    def _disconnect_registry(self) -> None:
        try:
            registry_events.changed.disconnect(self._models_changed)
        except (TypeError, RuntimeError):
            pass

    def _models_changed(self) -> None:
        try:
            self.model.reset_choices()
        except RuntimeError:  # the widget was closed
            self._disconnect_registry()

    # -- inputs ------------------------------------------------------------------

    def _image_layers(self, *_: Any) -> list:
        return [layer for layer in self.viewer.layers if isinstance(layer, Image)]

    def _on_layer_added(self, event=None) -> None:
        """A new layer may be the chosen image's count (made in the other dock, or opened from a file)."""
        try:
            self._on_image(self.image.value)
        except RuntimeError:  # the dock was closed: its Qt widgets are gone
            pass

    def _on_image(self, layer: Optional[Image]) -> None:
        n = channel_count(layer)
        self.channel.visible = n > 0
        if n:
            self.channel.max = n - 1
        points = self._points_layer()
        if points is not None:  # a result made here, in the Counting loop, or opened from a file
            style_as_count(points)
            self.watch(points)
            self._sync_threshold(points)
            self.count_label.setText(count_text(points, current_frame(points, self.viewer)))
        else:  # another image: the last image's result is not this one's
            self.count_label.setText("No count yet")
            table = getattr(self, "frame_table", None)
            if table is not None and table.layer is not layer:
                table.setVisible(False)

    def _on_frame(self, event=None) -> None:
        """Another frame of a stack is shown: the count shown is that frame's."""
        try:
            points = self._points_layer()
            if points is not None and points.ndim > 2:
                self.count_label.setText(count_text(points, current_frame(points, self.viewer)))
        except RuntimeError:  # the dock was closed: its Qt widgets are gone
            pass

    def _points_layer(self) -> Optional[Points]:
        layer = self.image.value
        if layer is None:
            return None
        name = result_name(layer.name)
        out = self.viewer.layers[name] if name in self.viewer.layers else None
        return out if isinstance(out, Points) else None

    def _inputs(self) -> Optional[dict]:
        layer = self.image.value
        if layer is None:
            show_error("Choose an image layer to count")
            return None
        model = self.model.value
        if model == "file":
            path = self.model_file.value
            if not path or not str(path) or str(path) == ".":
                show_error("Choose a model file, or pick 'default' or 'classic'")
                return None
            model = str(path)
        return {
            "layer": layer,
            "image": layer_pixels(layer),  # dask and multiscale layers stay lazy
            "model": model,
            "diameter": self.diameter.arg(),
            "channel": int(self.channel.value) if channel_count(layer) else None,
            "device": self.device.value,
        }

    # -- actions -----------------------------------------------------------------

    def estimate(self) -> None:
        """Guess the cell diameter from the chosen image and show it (the estimate stays on)."""
        args = self._inputs()
        if args is None or self.runner.running:
            return

        def work(progress):
            from ..count import estimate_diameter

            return estimate_diameter(estimate_input(args["image"]), channel=args["channel"])

        self.runner.start(work, on_done=lambda d: self.diameter.show(float(d)), label="Estimating the cell diameter",
                          detach_on_cancel=True)

    def run(self) -> None:
        """Count the chosen image; the result layer is added or updated when done."""
        args = self._inputs()
        if args is None or self.runner.running:
            return
        make = lazy_count_work if is_lazy(args["image"]) else count_work  # lazy: never loaded whole
        work = make(args["image"], model=args["model"], diameter=args["diameter"], channel=args["channel"],
                    device=args["device"])
        self.runner.start(work, on_done=lambda out: self._show(args, *out), label="Counting cells",
                          detach_on_cancel=True)

    # -- layers ------------------------------------------------------------------

    def _show(self, args: dict, counter, result) -> None:
        layer = args["layer"]
        params = {"model": args["model"], "diameter": args["diameter"], "channel": args["channel"],
                  "device": args["device"]}
        if counter.kind == "regression":
            meta = provenance("count", input=layer.name, parameters=params,
                              **{k: v for k, v in result.meta.items() if k != "operation"})
            self._show_windows(layer, result, meta)
            return
        out = show_points(self.viewer, layer, counter, result, parameters=params)
        if self.exclude_border.value:  # the box applies to a first count too
            apply_threshold(out, exclude_border=True)
        self.diameter.show(out.metadata.get("diameter_used"))
        self.watch(out)
        self._sync_threshold(out)
        self.count_label.setText(count_text(out, current_frame(out, self.viewer)))
        show_frame_table(self, layer, result)
        self.regions.update()

    def watch(self, layer: Points) -> None:
        """Follow clicks on ``layer``: its count and this widget's label update at once."""
        if id(layer) not in self._watched:
            layer.events.data.connect(lambda e, lay=layer: self._update_count(lay))
            self._watched.add(id(layer))

    def _sync_threshold(self, layer: Points) -> None:
        store = layer.metadata.get("points_store") or {}
        scores = np.asarray(store.get("scores", []), dtype=float)
        top = float(np.ceil(scores.max() * 100) / 100) if scores.size and scores.max() > 0 else 1.0
        self._setting_threshold = True
        try:
            self.threshold.max = max(top, float(store.get("threshold", 0.0)), 0.01)
            self.threshold.step = max(round(self.threshold.max / 100, 4), 0.0001)
            self.threshold.value = float(store.get("threshold", 0.0))
            self.exclude_border.value = bool(store.get("exclude_border", False))
        finally:
            self._setting_threshold = False

    def _on_threshold(self, value: float) -> None:
        self._show_model_points(threshold=float(value))

    def _on_border(self, value: bool) -> None:
        self._show_model_points(exclude_border=bool(value))

    def _show_model_points(self, **view) -> None:
        """The score threshold or the border box changed: the points shown and the count follow."""
        layer = self._points_layer()
        if self._setting_threshold or layer is None:
            return
        apply_threshold(layer, **view)
        self.count_label.setText(count_text(layer, current_frame(layer, self.viewer)))

    def _show_windows(self, layer, result, meta: dict) -> None:
        rects, texts = [], []
        for r0, c0, h, w, value in result.windows:
            rects.append(np.array([[r0, c0], [r0, c0 + w], [r0 + h, c0 + w], [r0 + h, c0]], dtype=float))
            texts.append(f"{value:.1f}")
        name = f"{layer.name} window counts"
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        ndim = 2
        self.viewer.add_shapes(rects, shape_type="rectangle", name=name, metadata=meta, edge_color="yellow",
                               face_color="transparent", features={"count": [float(t) for t in texts]},
                               text={"string": "{count:.1f}", "color": "yellow", "size": 10},
                               scale=tuple(layer.scale[-ndim:]), translate=tuple(layer.translate[-ndim:]))
        self.count_label.setText(f"Regression model: {result.count:.1f} cells (sum of {len(rects)} window "
                                 "counts; this model gives no cell positions)")

    def _update_count(self, layer: Points) -> None:
        refresh_count(layer)
        if layer is self._points_layer():
            self.count_label.setText(count_text(layer, current_frame(layer, self.viewer)))
