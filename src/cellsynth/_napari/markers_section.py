"""Count cells: marker-positive classes of the counted nuclei, from other image layers or channels.

Choose the markers (other image layers of the image's size, e.g. the Ki67 and EdU
channels napari opened as layers, or the channels of a multichannel image) and
*Classify*: each nucleus gets its mean intensity per marker (within half the
diameter used, :mod:`cellsynth.count.markers`), a class (``negative``, ``Ki67+``,
``Ki67+ EdU+`` ...) shown as the fill colour of its point, and the dock shows the
counts and percentages per class. The thresholds start as Otsu's on the nuclei's
means ("auto"); typing numbers re-classifies at once, without counting again.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from magicgui.widgets import Container, LineEdit, PushButton, Select
from napari.layers import Image
from napari.utils.notifications import show_error
from qtpy.QtWidgets import QLabel, QVBoxLayout, QWidget

from ._counting import channel_count, image_data, plane_shape

__all__ = ["MarkersSection", "CLASS_COLOURS"]

#: Fill colours of the classes, in the order :func:`~cellsynth.count.markers.class_counts` lists them.
CLASS_COLOURS = ("transparent", "magenta", "lime", "orange", "cyan", "red", "blue", "white")


class MarkersSection(QWidget):
    """The "marker classes" section of the Count cells dock."""

    def __init__(self, dock) -> None:
        super().__init__()
        self.dock = dock
        self.viewer = dock.viewer
        self.summary: Optional[dict] = None
        self._means: Optional[np.ndarray] = None
        self._names: list[str] = []
        self.markers = Select(label="markers", choices=self._choices,
                              tooltip="other image layers of this image's size, or its channels: each nucleus is "
                                      "measured in them and classed positive or negative per marker")
        self.thresholds = LineEdit(label="thresholds", value="auto",
                                   tooltip="auto: Otsu's method on the nuclei's mean intensities, per marker; or one "
                                           "number per marker, separated by commas (re-classifies at once)")
        self.button = PushButton(text="Classify")
        self.result = QLabel("")
        self.result.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(Container(widgets=[self.markers, self.thresholds, self.button]).native)
        layout.addWidget(self.result)
        self.button.changed.connect(lambda _value=None: self.classify())
        self.thresholds.changed.connect(lambda _value=None: self.reclassify())
        for ev in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            ev.connect(lambda _event=None: self.markers.reset_choices())
        self.dock.image.changed.connect(lambda _value=None: self.markers.reset_choices())

    def _choices(self, *_) -> list:
        image = self.dock.image.value
        if image is None:
            return []
        out = [(f"{image.name}: channel {c}", ("channel", c)) for c in range(channel_count(image))]
        plane = plane_shape(image)
        for layer in self.viewer.layers:
            if isinstance(layer, Image) and layer is not image and not channel_count(layer) \
                    and not layer.multiscale and tuple(np.shape(layer.data)) == plane:
                out.append((layer.name, ("layer", layer.name)))
        return out

    def _pixels(self, choice) -> np.ndarray:
        kind, key = choice
        if kind == "channel":
            return image_data(self.dock.image.value)[..., key]
        return image_data(self.viewer.layers[key])

    def classify(self) -> Optional[dict]:
        """Measure each counted nucleus in the chosen markers and class it."""
        from ..count.markers import nucleus_means

        points = self.dock._points_layer()
        chosen = list(self.markers.value or [])
        if points is None:
            show_error("Count the image first, then classify its nuclei")
            return None
        if not chosen:
            show_error("Choose one or more markers: image layers of this image's size, or its channels")
            return None
        if points.ndim != 2:
            show_error("Marker classes work on 2D images; this count is of a stack")
            return None
        d = float(points.metadata.get("diameter_used") or 15.0)
        channels = np.stack([np.asarray(self._pixels(c), float) for c in chosen])
        self._names = [f"ch{c[1]}" if c[0] == "channel" else str(c[1]) for c in chosen]
        self._means = nucleus_means(channels, np.asarray(points.data, float), diameter=d)
        return self.reclassify()

    def reclassify(self) -> Optional[dict]:
        """Class the measured nuclei at the thresholds typed (or auto) and colour their points."""
        from ..count.markers import THRESHOLD_METHOD, auto_thresholds, class_counts, classify

        points = self.dock._points_layer()
        if self._means is None or points is None or len(self._means) != len(points.data):
            return None  # nothing measured yet, or the points changed: Classify measures them again
        text = str(self.thresholds.value or "auto").strip()
        try:
            if text.lower() == "auto":
                thresholds, method = auto_thresholds(self._means), THRESHOLD_METHOD
            else:
                thresholds = [float(v) for v in text.split(",")]
                method = "typed"
                if len(thresholds) != len(self._names):
                    raise ValueError(f"type one threshold per marker ({len(self._names)}), separated by commas")
        except ValueError as exc:
            self.result.setText(f"Thresholds: {exc}")
            return None
        classes = classify(self._means, thresholds, self._names)
        rows = class_counts(list(classes), self._names)
        order = [r["class"] for r in rows]
        colours = {c: CLASS_COLOURS[i % len(CLASS_COLOURS)] for i, c in enumerate(order)}
        features = points.features.copy()
        for k, n in enumerate(self._names):
            features[f"mean_{n}"] = self._means[:, k]
        features["class"] = list(classes)
        points.features = features
        points.face_color = [colours[c] for c in classes]
        self.summary = {"names": self._names, "thresholds": thresholds, "threshold_method": method,
                        "classes": rows}
        shown = ", ".join(f"{n} {t:.4g}" for n, t in zip(self._names, thresholds))
        lines = [f"{r['class']}: {r['count']} ({r['percent']:g} %)" for r in rows]
        self.result.setText(f"Thresholds ({method}): {shown}\n" + "\n".join(lines))
        return self.summary
