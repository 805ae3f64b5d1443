"""Dock widget "Counting loop": image -> scale -> adapt -> count -> correct -> retrain -> count all."""

from __future__ import annotations

import shutil
from pathlib import Path

from typing import Any, Optional

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, PushButton
from napari.layers import Image, Points, Shapes
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QGroupBox, QLabel, QVBoxLayout, QWidget

from ..device import device_choices
from ._counting import (LEGEND, DiameterField, channel_count, count_text, count_work, current_frame, image_data,
                        prepare_counter, refresh_count, result_name, show_points)
from ._layers import on_layer_renamed, real_viewer
from ._models import new_model_dir, registry_events, remember_model
from ._tasks import TaskRunner, dock_layout
from .count_widget import model_choices
from .curves import TrainingCurves

__all__ = ["against_budget", "LoopWidget", "regions_name", "checked_regions"]

_CORRECT_HELP = (
    "In <i>&lt;image&gt; cells</i>: add mode (+), click a missed cell; select wrong points, press Delete. "
    "Then draw rectangles over the areas you checked (without any, the whole image counts as checked)."
)


def regions_name(image_name: str) -> str:
    """Name of the Shapes layer of rectangles marking the regions checked in ``image_name``."""
    return f"{image_name} checked regions"


def against_budget(progress, minutes: float):
    """``progress`` with the time spent against the budget added to each message ("1:12 of 3:00")."""
    import dataclasses
    import time

    start = time.monotonic()

    def clock(seconds: float) -> str:
        return f"{int(seconds // 60)}:{int(seconds % 60):02d}"

    def timed(event):
        spent = f"{clock(time.monotonic() - start)} of {clock(60.0 * float(minutes))}"
        message = f"{event.message} · {spent}" if event.message else spent
        return progress(dataclasses.replace(event, message=message))

    return None if progress is None else timed


def checked_regions(shapes: Optional[Shapes], shape: tuple) -> Optional[list]:
    """``(row0, col0, row1, col1)`` boxes (end exclusive, inside ``shape``) around each shape, or None."""
    if shapes is None or len(shapes.data) == 0:
        return None
    boxes = []
    for verts in shapes.data:
        v = np.asarray(verts, dtype=float)[:, -2:]
        r0, c0 = np.floor(v.min(axis=0)).astype(int)
        r1, c1 = np.ceil(v.max(axis=0)).astype(int)
        r0, c0 = max(r0, 0), max(c0, 0)
        r1, c1 = min(r1, shape[0]), min(c1, shape[1])
        if r1 > r0 and c1 > c0:
            boxes.append((int(r0), int(c0), int(r1), int(c1)))
    return boxes or None


def _step(title: str, *parts) -> QGroupBox:
    box = QGroupBox(title)
    lay = QVBoxLayout(box)
    lay.setContentsMargins(4, 4, 4, 4)
    for p in parts:
        if isinstance(p, Container):
            p.margins = (0, 0, 0, 0)
        lay.addWidget(p.native if hasattr(p, "native") else p)
    return box


class LoopWidget(QWidget):
    """The counting loop in six steps, each leaving something to inspect in the viewer.

    1. choose the image; the cell diameter is estimated (shown, editable);
    2. *Adapt to this image*: a counter adapted without labels, saved under the
       user data folder and offered in the model lists;
    3. *Count*: the Points layer "<image> cells" (as the Count cells widget makes it);
    4. correct the points by hand and mark the regions you checked (a Shapes layer
       "<image> checked regions");
    5. *Retrain on my corrections*: a new counter, saved and offered likewise;
    6. *Count all open images* with it.

    Adapting and retraining show the counts before and after; Cancel stops them and
    leaves the viewer and the models folder as they were.
    """

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = real_viewer(napari_viewer)
        self.params = None  # AdaptParams for adapting and retraining; None: the defaults
        # 1
        self.image = ComboBox(label="image", choices=self._image_layers)
        self.diameter = DiameterField()
        self.estimate_button = PushButton(text="Estimate diameter")
        self.device = ComboBox(label="device", choices=device_choices(), value="auto")
        # 2
        self.adapt_all = CheckBox(value=False, text="use every open image, not only this one")
        self.minutes = FloatSpinBox(label="minutes", value=3.0, min=0.05, max=240.0, step=0.5,
                                    tooltip="time budget of the adaptation")
        self.adapt_button = PushButton(text="Adapt to this image")
        # 3
        self.model = ComboBox(label="model", choices=lambda *_: model_choices(with_file=False), value="default",
                              tooltip="the counter used to count; adapting or retraining selects the new one")
        self.count_button = PushButton(text="Count")
        # 4
        self.regions_button = PushButton(text="Mark checked regions")
        # 5
        self.retrain_minutes = FloatSpinBox(label="minutes", value=2.0, min=0.05, max=240.0, step=0.5,
                                            tooltip="time budget of the retraining")
        self.retrain_all = CheckBox(value=False, text="also every open image with checked regions marked")
        self.retrain_button = PushButton(text="Retrain on my corrections")
        # 6
        self.count_all_button = PushButton(text="Count all open images")

        self.count_label = QLabel("No count yet")
        self.count_label.setWordWrap(True)
        self.result_label = QLabel("")
        self.result_label.setWordWrap(True)
        self.curves = TrainingCurves()
        self.runner = TaskRunner()
        self._watched: set[int] = set()

        help_label = QLabel(_CORRECT_HELP)
        help_label.setWordWrap(True)
        legend = QLabel(LEGEND)
        legend.setWordWrap(True)
        layout = dock_layout(self, self.runner)  # scrolls, never clipped, the task panel always in view
        layout.addWidget(_step("1 · Image and cell size",
                               Container(widgets=[self.image, self.diameter, self.estimate_button, self.device])))
        layout.addWidget(_step("2 · Adapt a counter to it (no labels needed)",
                               Container(widgets=[self.adapt_all, self.minutes, self.adapt_button])))
        layout.addWidget(_step("3 · Count", Container(widgets=[self.model, self.count_button]), self.count_label,
                               legend))
        layout.addWidget(_step("4 · Correct the points", help_label, self.regions_button))
        layout.addWidget(_step("5 · Retrain on your corrections",
                               Container(widgets=[self.retrain_all, self.retrain_minutes, self.retrain_button])))
        layout.addWidget(_step("6 · Count every open image", self.count_all_button))
        layout.addWidget(self.result_label)
        layout.addWidget(self.curves)
        layout.addStretch(1)

        self.estimate_button.changed.connect(self.estimate)
        self.adapt_button.changed.connect(self.adapt)
        self.count_button.changed.connect(self.count)
        self.regions_button.changed.connect(self.mark_regions)
        self.retrain_button.changed.connect(self.retrain)
        self.count_all_button.changed.connect(self.count_all)
        self.image.changed.connect(self._on_image)
        buttons = (self.estimate_button, self.adapt_button, self.count_button, self.retrain_button,
                   self.count_all_button)
        self.runner.busy.connect(lambda b: [setattr(w, "enabled", not b) for w in buttons])
        for ev in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed,
                   self.viewer.layers.events.moved):
            ev.connect(self.image.reset_choices)
        self.viewer.layers.events.inserted.connect(self._on_layer_added)
        on_layer_renamed(self.viewer, self.image.reset_choices)
        registry_events.changed.connect(self._models_changed)
        prepare_counter(self.model.value)  # the one-time export, in another process, before the first Count

    # -- helpers -----------------------------------------------------------------

    def _models_changed(self) -> None:
        try:
            self.model.reset_choices()
        except RuntimeError:  # the widget was closed
            registry_events.changed.disconnect(self._models_changed)

    def _image_layers(self, *_: Any) -> list:
        return [layer for layer in self.viewer.layers if isinstance(layer, Image)]

    def _on_layer_added(self, event=None) -> None:
        """A new layer may be the chosen image's count (made in the other dock, or opened from a file)."""
        try:
            self._on_image(self.image.value)
        except RuntimeError:  # the dock was closed: its Qt widgets are gone
            pass

    def _on_image(self, layer: Optional[Image]) -> None:
        pts = self._points_layer(layer)
        if pts is not None:  # a result made here, in Count cells, or opened from a file
            self._watch(pts)
        self.count_label.setText("No count yet" if pts is None else count_text(pts, current_frame(pts, self.viewer)))

    def _points_layer(self, image: Optional[Image]) -> Optional[Points]:
        if image is None:
            return None
        name = result_name(image.name)
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        return layer if isinstance(layer, Points) else None

    def _chosen(self) -> Optional[Image]:
        layer = self.image.value
        if layer is None:
            show_error("Open an image first (File > Open), then choose it in step 1")
        return layer

    def _channel(self, layer: Image) -> Optional[int]:
        return 0 if channel_count(layer) else None

    def _start(self, work, on_done, label: str) -> bool:
        if self.runner.running:
            show_info("Wait for the running step to finish, or press Cancel")
            return False
        self.runner.start(work, on_done=on_done, label=label)
        return True

    # -- 1 -----------------------------------------------------------------------

    def estimate(self) -> None:
        """Estimate the cell diameter of the chosen image and show it."""
        layer = self._chosen()
        if layer is None:
            return
        img, ch = image_data(layer), self._channel(layer)

        def work(progress):
            from ..count import estimate_diameter

            return estimate_diameter(img, channel=ch)

        self._start(work, lambda d: self.diameter.show(float(d)), "Estimating the cell diameter")

    # -- 2 -----------------------------------------------------------------------

    def adapt(self) -> None:
        """Adapt a counter to the chosen image (or every open image) and select it."""
        layer = self._chosen()
        if layer is None:
            return
        layers = self._image_layers() if self.adapt_all.value else [layer]
        images = [image_data(lay) for lay in layers]
        base = self.model.value if self.model.value != "classic" else "default"
        out = new_model_dir(layer.name, "adapted")
        kwargs = dict(out=out, base=base, diameter=self.diameter.arg(), minutes=float(self.minutes.value),
                      device=self.device.value, params=self.params)

        def work(progress):
            from ..adapt import adapt_counter

            return adapt_counter(images, progress=against_budget(progress, kwargs["minutes"]), **kwargs)

        self._start(work, lambda res: self._made(res, "adapted", layers), "Adapting a counter (label-free)")

    def _made(self, res, kind: str, layers: list) -> None:
        if res.path is None:
            return
        report = res.report if isinstance(res.report, dict) else {}
        self.curves.show_report(report)
        decision = report.get("decision", "")
        d = (report.get("diameter") or {}).get("used")
        if d:
            self.diameter.show(float(d))
        base = self.model.value if self.model.value != "classic" else "default"
        if not res.accepted:
            # a copy of the starting counter is no new counter: nothing is kept or offered, the base stays selected
            shutil.rmtree(res.path, ignore_errors=True)
            why = decision.split(": ", 1)[1] if decision.startswith("kept the base: ") else decision
            self.result_label.setText(f"Not {kind}: the new counter did not beat '{Path(base).name}' on the check"
                                      + (f" ({why})" if why else "") + f". '{Path(base).name}' stays selected; "
                                      "nothing was saved.")
            return
        remember_model(res.path, kind=kind, image=layers[0].name, accepted=True,
                       counts_before=res.counts_before, counts_after=res.counts_after)
        self.model.reset_choices()
        self.model.value = str(res.path)
        counts = "; ".join(f"{lay.name}: {b} → {a}" for lay, b, a in zip(layers, res.counts_before, res.counts_after))
        evidence = decision.split(": ", 1)[1] if decision.startswith("accepted: ") else decision
        self.result_label.setText(f"{kind.capitalize()} counter saved as {res.path.name} and selected in step 3. "
                                  f"Cells counted before → after: {counts}."
                                  + (f" Why: {evidence}." if evidence else ""))

    # -- 3 and 6 -----------------------------------------------------------------

    def count(self) -> None:
        """Count the chosen image with the selected counter."""
        layer = self._chosen()
        if layer is None:
            return
        self._count([layer])

    def count_all(self) -> None:
        """Count every open image with the selected counter."""
        layers = self._image_layers()
        if not layers:
            show_error("Open an image first (File > Open)")
            return
        self._count(layers)

    def _count(self, layers: list) -> None:
        chosen = self.image.value
        jobs = [(lay, image_data(lay), self.diameter.arg() if lay is chosen else "auto", self._channel(lay))
                for lay in layers]
        model, device = self.model.value, self.device.value

        def work(progress):
            out = []
            for lay, img, d, ch in jobs:
                out.append((lay,) + count_work(img, model=model, diameter=d, channel=ch, device=device)(progress))
            return out

        label = "Counting cells" if len(layers) == 1 else f"Counting cells in {len(layers)} images"
        self._start(work, lambda out: self._show(out, model, device), label)

    def _show(self, out: list, model: str, device: str) -> None:
        lines = []
        for lay, counter, result in out:
            if counter.kind == "regression":
                raise ValueError("the counting loop needs a counter that gives cell positions; "
                                 "use the Count cells widget for regression counters")
            params = {"model": model, "diameter": result.meta.get("diameter_used"), "device": device}
            pts = show_points(self.viewer, lay, counter, result, parameters=params)
            self._watch(pts)
            lines.append(f"{lay.name}: {len(pts.data)}")
            if lay is self.image.value:
                self.diameter.show(pts.metadata.get("diameter_used"))
                self.count_label.setText(count_text(pts, current_frame(pts, self.viewer)))
        if len(out) > 1:
            self.result_label.setText("Counted: " + "; ".join(lines))
            rows = [{"image": lay.name, "count": len(self.viewer.layers[result_name(lay.name)].data),
                     "diameter": result.meta.get("diameter_used")} for lay, _, result in out]
            self._images_table().set_images(rows)

    def _images_table(self):
        """The "counts per image" table with Export CSV, below step 6 (made on first use)."""
        if getattr(self, "images_table", None) is None:
            from .frame_table import FrameTable

            self.images_table = FrameTable(self.viewer)
            lay = self.result_label.parentWidget().layout()
            lay.insertWidget(lay.indexOf(self.result_label) + 1, self.images_table)
        return self.images_table

    def _watch(self, layer: Points) -> None:
        if id(layer) not in self._watched:
            layer.events.data.connect(lambda e, lay=layer: self._update_count(lay))
            self._watched.add(id(layer))

    def _update_count(self, layer: Points) -> None:
        refresh_count(layer)
        if layer is self._points_layer(self.image.value):
            self.count_label.setText(count_text(layer, current_frame(layer, self.viewer)))

    # -- 4 -----------------------------------------------------------------------

    def mark_regions(self) -> None:
        """Add (or select) the Shapes layer "<image> checked regions", ready to draw rectangles."""
        layer = self._chosen()
        if layer is None:
            return
        name = regions_name(layer.name)
        shapes = self.viewer.layers[name] if name in self.viewer.layers else None
        if not isinstance(shapes, Shapes):
            ndim = 2
            shapes = self.viewer.add_shapes(name=name, ndim=ndim, edge_color="lime", face_color="transparent",
                                            edge_width=2, scale=tuple(layer.scale[-ndim:]),
                                            translate=tuple(layer.translate[-ndim:]),
                                            metadata={"cellsynth": {"operation": "checked regions",
                                                                    "input": layer.name}})
        self.viewer.layers.selection.active = shapes
        shapes.mode = "add_rectangle"

    # -- 5 -----------------------------------------------------------------------

    def retrain(self) -> None:
        """Retrain the selected counter on the corrected points of the chosen image (and, with the box ticked,
        of every other open image whose checked regions are marked)."""
        layer = self._chosen()
        if layer is None:
            return
        base = self.model.value
        if base == "classic":
            show_error("Retraining needs a density counter: choose 'default' or one adapted here in step 3")
            return
        first = self._corrections(layer)
        if isinstance(first, str):
            show_error(first)
            return
        layers, found = [layer], [first]
        if self.retrain_all.value:
            for other in self._image_layers():
                name = regions_name(other.name)
                if other is layer or name not in self.viewer.layers or not len(self.viewer.layers[name].data):
                    continue
                got = self._corrections(other)
                if isinstance(got, str):
                    show_info(f"'{other.name}' left out: {got}")
                    continue
                layers.append(other)
                found.append(got)
        imgs, points, regions = (list(x) for x in zip(*found))
        out = new_model_dir(layer.name, "retrained")
        kwargs = dict(out=out, base=base, regions=None if all(r is None for r in regions) else regions,
                      diameter=self.diameter.arg(), minutes=float(self.retrain_minutes.value),
                      device=self.device.value, params=self.params)

        def work(progress):
            from ..adapt import retrain_counter

            return retrain_counter(imgs, points, progress=against_budget(progress, kwargs["minutes"]), **kwargs)

        label = "Retraining on your corrections" + (f" ({len(layers)} images)" if len(layers) > 1 else "")
        self._start(work, lambda res: self._made(res, "retrained", layers), label)

    def _corrections(self, layer: Image):
        """``(image, corrected points, checked boxes or None)`` of an image layer, or why it cannot be used."""
        pts = self._points_layer(layer)
        if pts is None or len(pts.data) == 0:
            return f"Count '{layer.name}' first (step 3) and correct its points"
        img = image_data(layer)
        if np.shape(pts.data)[1] != 2 or (channel_count(layer) == 0 and img.ndim != 2):
            return f"Retraining works on 2D images; '{layer.name}' is a stack"
        name = regions_name(layer.name)
        shapes = self.viewer.layers[name] if name in self.viewer.layers else None
        regions = checked_regions(shapes if isinstance(shapes, Shapes) else None, img.shape[:2])
        points = np.asarray(pts.data, dtype=float).copy()
        inside = np.all((points >= -0.5) & (points <= np.asarray(img.shape[:2], float) - 0.5), axis=1)
        if not inside.all():  # clicks beside the image are no cells of it
            show_info(f"{int((~inside).sum())} point(s) of '{pts.name}' lie outside the image and are left out")
            points = points[inside]
        return img, points, regions
