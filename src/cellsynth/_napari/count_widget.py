"""Dock widget "Count cells": run a counter, show cells as points, click to correct."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, FloatSpinBox, PushButton, SpinBox
from napari.layers import Image, Points
from napari.utils.notifications import show_error
from qtpy.QtWidgets import QLabel, QVBoxLayout, QWidget

from ..device import device_choices
from ._layers import provenance, upsert_layer
from ._tasks import TaskRunner

__all__ = ["CountWidget", "result_name"]

MODELS = ("default", "classic", "file")


def result_name(image_name: str) -> str:
    """Name of the Points layer holding the cells counted in ``image_name``."""
    return f"{image_name} cells"


class CountWidget(QWidget):
    """Count cells in an image layer with a density model, a regression model or the classic counter.

    The result is a Points layer "<image> cells" with features ``score`` and
    ``source`` ("model" or "manual"). Click in add mode to add a cell, select
    points and press Delete to remove them: the count shown here follows at once.
    A regression model gives counts per 256x256 window and no positions; they are
    shown as a Shapes layer "<image> window counts".
    """

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.image = ComboBox(label="image", choices=self._image_layers)
        self.model = ComboBox(label="model", choices=MODELS, value="default",
                              tooltip="default: the shipped density counter; classic: Laplacian-of-Gaussian "
                                      "peaks, no weights; file: a counter you trained")
        self.model_file = FileEdit(label="model file", mode="r", filter="*.safetensors *.json", visible=False)
        self.diameter = FloatSpinBox(label="cell diameter (px)", value=0.0, min=0.0, max=1000.0, step=0.5,
                                     tooltip="typical cell diameter in pixels; 0 uses the model's training scale")
        self.estimate_button = PushButton(text="Estimate diameter")
        self.channel = SpinBox(label="RGB channel", value=0, min=0, max=3,
                               tooltip="channel to count in RGB images")
        self.device = ComboBox(label="device", choices=device_choices(), value="auto")
        self.run_button = PushButton(text="Count")
        self.count_label = QLabel("No count yet")
        self.count_label.setWordWrap(True)
        self.runner = TaskRunner()
        self._watched: set[int] = set()

        form = Container(widgets=[self.image, self.model, self.model_file, self.diameter, self.estimate_button,
                                  self.channel, self.device, self.run_button])
        layout = QVBoxLayout(self)
        layout.addWidget(form.native)
        layout.addWidget(self.count_label)
        layout.addWidget(self.runner)
        layout.addStretch(1)

        self.model.changed.connect(lambda v: setattr(self.model_file, "visible", v == "file"))
        self.run_button.changed.connect(self.run)
        self.estimate_button.changed.connect(self.estimate)
        self.runner.busy.connect(lambda b: [setattr(w, "enabled", not b) for w in (self.run_button, self.estimate_button)])
        self.viewer.layers.events.inserted.connect(self.image.reset_choices)
        self.viewer.layers.events.removed.connect(self.image.reset_choices)
        self.viewer.layers.events.moved.connect(self.image.reset_choices)

    # -- inputs ------------------------------------------------------------------

    def _image_layers(self, *_: Any) -> list:
        return [layer for layer in self.viewer.layers if isinstance(layer, Image)]

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
        data = np.asarray(layer.data if not layer.multiscale else layer.data[0])
        return {
            "layer": layer,
            "image": data,
            "model": model,
            "diameter": float(self.diameter.value) or None,
            "channel": int(self.channel.value) if layer.rgb else None,
            "device": self.device.value,
        }

    # -- actions -----------------------------------------------------------------

    def estimate(self) -> None:
        """Guess the cell diameter from the chosen image."""
        args = self._inputs()
        if args is None or self.runner.running:
            return

        def work(progress):
            from ..count import estimate_diameter

            return estimate_diameter(args["image"], channel=args["channel"])

        self.runner.start(work, on_done=lambda d: setattr(self.diameter, "value", round(float(d), 1)),
                          label="Estimating the cell diameter")

    def run(self) -> None:
        """Count the chosen image; the result layer is added or updated when done."""
        args = self._inputs()
        if args is None or self.runner.running:
            return

        def work(progress):
            from ..count import count_cells, load_counter

            counter = load_counter(args["model"], device=args["device"])
            return counter, count_cells(args["image"], counter=counter, diameter=args["diameter"],
                                        channel=args["channel"], device=args["device"], progress=progress)

        self.runner.start(work, on_done=lambda out: self._show(args, *out), label="Counting cells")

    # -- layers ------------------------------------------------------------------

    def _show(self, args: dict, counter, result) -> None:
        layer = args["layer"]
        params = {"model": args["model"], "diameter": args["diameter"], "channel": args["channel"],
                  "device": args["device"]}
        meta = provenance("count", input=layer.name, parameters=params,
                          **{k: v for k, v in result.meta.items() if k != "operation"})
        name = result_name(layer.name)
        if counter.kind == "regression":
            self._show_windows(layer, result, meta)
            return
        pts = np.asarray(result.points, dtype=float)
        n = len(pts)
        features = {"score": np.asarray(result.scores, dtype=float).reshape(n),
                    "source": np.array(["model"] * n, dtype=object)}
        size = float(args["diameter"] or result.meta.get("diameter") or 10.0) * 0.6
        out = upsert_layer(self.viewer, name, "points", pts, metadata=meta, features=features, like=layer,
                           size=size, face_color="source", border_width=0.1, border_color="black")
        out.feature_defaults = {"score": 1.0, "source": "manual"}
        if id(out) not in self._watched:
            out.events.data.connect(lambda e, lay=out: self._update_count(lay))
            self._watched.add(id(out))
        self._update_count(out)

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
        src = layer.features["source"].astype(str).to_numpy() if "source" in layer.features else np.array([])
        n = len(layer.data)
        manual = int(np.count_nonzero(src == "manual"))
        layer.metadata = {**layer.metadata, "count": n}
        self.count_label.setText(f"Count: {n} ({n - manual} from the model, {manual} added by hand)")
