"""Dock widget "NSC masks": neural spectral clustering masks of any image layer."""

from __future__ import annotations

from typing import Optional

import numpy as np
from magicgui.widgets import ComboBox, Container, PushButton, SpinBox
from napari.utils.notifications import show_error
from qtpy.QtWidgets import QLabel, QWidget
from superqt import QCollapsible

from ..stain.params import BACKBONES, FOREGROUND_MODES, NSCParams
from ._layers import on_layer_renamed, provenance, real_viewer, upsert_layer
from ._params import ParamsForm
from ._tasks import TaskRunner, dock_layout

__all__ = ["NSCWidget", "mask_layer_name"]


def mask_layer_name(image_name: str, channel: Optional[int] = None) -> str:
    """Name of the Labels layer holding the NSC mask of a layer (and channel)."""
    return f"{image_name} NSC" if channel is None else f"{image_name} NSC [{channel}]"


def image_layers(viewer) -> list:
    import napari

    return [layer for layer in viewer.layers if isinstance(layer, napari.layers.Image)]


class NSCWidget(QWidget):
    """NSC masks of an image layer, one Labels layer per channel, with progress and Cancel.

    A 2-D layer gives one mask; a (C, M, N) layer gives one mask per channel, or
    only the chosen channel. The status line and the layer metadata name the
    backbone that produced the features.
    """

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = real_viewer(napari_viewer)
        self.layer = ComboBox(label="image", choices=self._layer_choices)
        self.channel = SpinBox(value=-1, min=-1, max=1024, label="channel (-1: all)")
        self.backbone = ComboBox(value="filters", choices=list(BACKBONES), label="backbone")
        self.foreground = ComboBox(value="auto", choices=list(FOREGROUND_MODES), label="foreground")
        from ..device import device_choices

        self.device = ComboBox(value="auto", choices=device_choices(), label="device")
        self.form = ParamsForm(NSCParams, key="nsc", exclude=("backbone", "foreground"))
        self.run_button = PushButton(text="Compute masks")
        self.runner = TaskRunner()
        self.info = QLabel("")
        self.info.setWordWrap(True)
        box = QCollapsible("Parameters")
        box.addWidget(self.form.native)
        controls = Container(widgets=[self.layer, self.channel, self.backbone, self.foreground, self.device,
                                      self.run_button])
        layout = dock_layout(self, self.runner)
        layout.addWidget(controls.native)
        layout.addWidget(box)
        layout.addWidget(self.info)
        layout.addStretch(1)
        self.run_button.changed.connect(self.run)
        self.layer.changed.connect(self._update_channel)
        self._update_channel()
        self.runner.busy.connect(lambda busy: setattr(self.run_button, "enabled", not busy))
        self.viewer.layers.events.inserted.connect(self._refresh)
        self.viewer.layers.events.removed.connect(self._refresh)
        on_layer_renamed(self.viewer, self._refresh)

    def _layer_choices(self, _widget=None) -> list:
        return [(layer.name, layer) for layer in image_layers(self.viewer)]

    def _refresh(self, event=None) -> None:
        self.layer.reset_choices()
        self._update_channel()

    def _update_channel(self, _value=None) -> None:
        """The channel box shows only for a layer with channels ((C, M, N)); a grayscale plane has none."""
        layer = self.layer.value
        shape = tuple(np.shape(layer.data)) if layer is not None else ()
        if layer is not None and layer.rgb and len(shape) == 3 and shape[-1] in (3, 4):
            shape = shape[:-1]
        self.channel.visible = len(shape) == 3

    def run(self) -> None:
        """Compute masks of the chosen layer in a worker thread."""
        self._refresh()
        layer = self.layer.value
        if layer is None or self.runner.running:
            if layer is None:
                show_error("Choose an image layer first")
            return
        try:
            params = self.form.params(backbone=self.backbone.value, foreground=self.foreground.value)
        except ValueError as exc:
            self.runner.status.setText(f"Error: {exc}")
            show_error(f"NSC parameters: {exc}")
            return
        raw, rgb = layer.data, bool(layer.rgb)  # the pixels are read and converted in the worker
        shape = tuple(np.shape(raw))
        if rgb and len(shape) == 3 and shape[-1] in (3, 4):
            shape = shape[:-1]
        channel = int(self.channel.value)
        if len(shape) == 2:
            channels = [None]
        elif len(shape) == 3:
            if channel >= shape[0]:
                self.runner.status.setText(f"Error: channel {channel} does not exist; the layer has {shape[0]}")
                return
            channels = list(range(shape[0])) if channel < 0 else [channel]
        else:
            self.runner.status.setText(f"Error: expected a 2-D or (C, M, N) layer, got shape {shape}")
            return
        device = self.device.value
        self.form.save()

        def work(progress):
            from ..stain.features import make_backbone
            from ..stain.nsc import nsc_channels

            data = np.asarray(raw)
            if rgb and data.ndim == 3 and data.shape[-1] in (3, 4):
                data = data[..., :3].mean(axis=-1)
            planes = data[None] if data.ndim == 2 else data[channels]
            backbone = make_backbone(params.backbone, device=device, progress=progress)
            return backbone.name, nsc_channels(planes, params=params, backbone=backbone, progress=progress)

        self.runner.start(work, on_done=lambda res: self._show(layer, channels, params, *res),
                          label=f"NSC masks of {layer.name}", detach_on_cancel=True)

    def _show(self, layer, channels, params: NSCParams, backbone: str, results):
        for ch, res in zip(channels, results):
            meta = provenance("stain.nsc", backbone=backbone, params=params.to_dict(), source=layer.name,
                              channel=ch, plane=ch, cluster_means=[round(float(m), 4) for m in res.cluster_means])
            upsert_layer(self.viewer, mask_layer_name(layer.name, ch), "labels", res.mask, metadata=meta,
                         like=layer, opacity=0.5)
            yield  # one layer per event-loop turn
        text = f"Masks from {backbone} features (k={params.k}, r={params.r}, {params.foreground})"
        if len(channels) > 1 or channels[0] is not None:
            names = (layer.metadata or {}).get("planes") or (layer.metadata or {}).get("channel_names") or []
            which = ", ".join(f"[{ch}] from plane {ch}" + (f" ({names[ch]})" if ch < len(names) else "")
                              for ch in channels)
            text += f"; one mask per plane, each from that plane alone: {which}"
        self.info.setText(text)
