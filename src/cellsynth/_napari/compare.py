"""Count cells: compare the counted points with one's own annotation (a Points layer).

Each counted point is matched one to one with an annotated point within half the
diameter used (:func:`cellsynth.count.metrics.match_points`); the dock shows
matched / extra / missed with precision, recall and F1, and the Points layer
``"<image> comparison"`` marks the points that disagree: extra counted points in
magenta squares, missed annotated ones in orange diamonds, to click through.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from magicgui.widgets import ComboBox, Container, PushButton
from napari.layers import Points
from napari.utils.notifications import show_error
from qtpy.QtWidgets import QLabel, QVBoxLayout, QWidget

from ._counting import result_name
from ._layers import provenance

__all__ = ["CompareSection", "compare_layers", "comparison_name"]


def comparison_name(image_name: str) -> str:
    """Name of the Points layer that marks where a count and an annotation disagree."""
    return f"{image_name} comparison"


def _world(layer: Points) -> np.ndarray:
    """The layer's points in world coordinates (row, col), ``(K, 2)``."""
    data = np.asarray(layer.data, float).reshape(-1, layer.ndim)[:, -2:]
    scale, translate = np.asarray(layer.scale[-2:], float), np.asarray(layer.translate[-2:], float)
    return data * scale + translate


def compare_layers(counted: Points, annotated: Points, *, radius_world: float) -> dict:
    """Match ``counted`` with ``annotated`` in world coordinates (2D layers); :func:`match_points`'s dict.

    Raises
    ------
    ValueError
        A layer of a stack (more than 2 dimensions), or a radius that is not positive.
    """
    from ..count.metrics import match_points

    for layer in (counted, annotated):
        if np.ndim(layer.data) != 2 or layer.ndim != 2:
            raise ValueError(f"'{layer.name}' has {layer.ndim} dimensions; the comparison works on 2D points")
    return match_points(_world(counted), _world(annotated), radius=radius_world, indices=True)


class CompareSection(QWidget):
    """The "compare with my annotation" section of the Count cells dock."""

    def __init__(self, dock) -> None:
        super().__init__()
        self.dock = dock
        self.viewer = dock.viewer
        self.annotation = ComboBox(label="compare with", choices=self._choices, nullable=True,
                                   tooltip="a Points layer of your own annotation: counted points are matched to "
                                           "it within half the diameter used")
        self.button = PushButton(text="Compare")
        self.result = QLabel("")
        self.result.setWordWrap(True)
        form = Container(widgets=[self.annotation, self.button])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(form.native)
        layout.addWidget(self.result)
        self.button.changed.connect(self.compare)
        for ev in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            ev.connect(self.annotation.reset_choices)

    def _choices(self, *_) -> list:
        image = self.dock.image.value
        skip = {result_name(image.name), comparison_name(image.name)} if image is not None else set()
        return [layer for layer in self.viewer.layers if isinstance(layer, Points) and layer.name not in skip]

    def compare(self) -> Optional[dict]:
        """Compare the chosen image's counted points with the chosen annotation; show and mark the result."""
        image, annotated = self.dock.image.value, self.annotation.value
        counted = self.dock._points_layer()
        if image is None or counted is None:
            show_error("Count the image first, then compare its points with your annotation")
            return None
        if annotated is None:
            show_error("Choose the Points layer of your annotation under 'compare with'")
            return None
        d = counted.metadata.get("diameter_used")
        if not d:
            show_error(f"'{counted.name}' does not say which diameter it was counted at; count it again")
            return None
        radius = 0.5 * float(d) * float(np.mean(np.abs(image.scale[-2:])))
        try:
            m = compare_layers(counted, annotated, radius_world=radius)
        except ValueError as exc:
            show_error(str(exc))
            return None
        extra, missed = _world(counted)[m["extra"]], _world(annotated)[m["missed"]]
        marks = np.concatenate([extra, missed]) if len(extra) + len(missed) else np.zeros((0, 2))
        kinds = ["extra"] * len(extra) + ["missed"] * len(missed)
        scale, translate = np.asarray(image.scale[-2:], float), np.asarray(image.translate[-2:], float)
        meta = provenance("compare", input=image.name, counted=counted.name, annotation=annotated.name,
                          radius_px=0.5 * float(d), **{k: m[k] for k in ("tp", "fp", "fn", "precision", "recall",
                                                                          "f1")})
        name = comparison_name(image.name)
        if name in self.viewer.layers:  # per-point symbols and colours: the layer is made anew each time
            self.viewer.layers.remove(name)
        self.viewer.add_points((marks - translate) / scale, name=name, metadata=meta, features={"kind": kinds},
                               scale=tuple(scale), translate=tuple(translate), size=float(d) * 1.2,
                               symbol=["square" if k == "extra" else "diamond" for k in kinds] or "square",
                               face_color="transparent", border_width=0.12,
                               border_color=["magenta" if k == "extra" else "orange" for k in kinds] or "magenta")
        self.viewer.layers.selection.active = counted  # clicks still correct the count
        self.result.setText(
            f"Against '{annotated.name}': {m['tp']} matched, {m['fp']} extra (magenta), {m['fn']} missed (orange) "
            f"within {0.5 * float(d):.1f} px; precision {m['precision']:.2f}, recall {m['recall']:.2f}, "
            f"F1 {m['f1']:.2f}")
        return m
