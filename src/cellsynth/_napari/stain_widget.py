"""Dock widget "Virtual staining": brightfield planes -> fluorescence channels (DiffStain)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, PushButton, SpinBox
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QLabel, QWidget
from superqt import QCollapsible

from ..stain.params import BACKBONES, PRESETS, SCHEDULERS, NSCParams, StainParams, stain_preset
from ._layers import on_layer_renamed, provenance, real_viewer, robust_limits, upsert_layer
from ._params import ParamsForm
from ._tasks import TaskRunner, dock_layout
from .nsc_widget import image_layers

__all__ = ["StainWidget", "stain_layer_name", "round_mask_name", "CHANNEL_PERCENTILES", "BRIGHTFIELD_OPACITY"]

#: Percentiles of each virtual channel mapped to its colormap's ends: the dim background
#: goes dark, so the channels add up to colours rather than to white over the brightfield.
CHANNEL_PERCENTILES = (50.0, 99.8)

#: Opacity given to a fully opaque brightfield layer under its first virtual channels:
#: it stays visible as context without drowning the additive colours.
BRIGHTFIELD_OPACITY = 0.35


def stain_layer_name(channel: str, source: str) -> str:
    """Name of the Image layer of a virtual channel stained from the layer called ``source``.

    Each input has its own result layers, so staining a second image never replaces the first one's.
    """
    return f"{source} virtual {channel}"


def round_mask_name(channel: str, round_i: int, source: str) -> str:
    """Name of the Labels layer of the guidance mask of a channel in a round (1-based)."""
    return f"{source} virtual {channel} mask (round {round_i})"


def _is_stain_result(layer) -> bool:
    rec = layer.metadata.get("cellsynth", {}) if isinstance(layer.metadata, dict) else {}
    return isinstance(rec, dict) and str(rec.get("operation", "")).startswith("stain.")


class StainWidget(QWidget):
    """Virtual fluorescence channels from a brightfield layer with a staining model.

    The input layer holds the brightfield planes as (B, M, N) (B as the model
    expects; a 2-D layer is repeated into every plane). The model is the shipped
    demo model unless a model folder is chosen. Output: one Image layer per
    channel (names and colormaps from the model config, additive blending,
    contrast limits at :data:`CHANNEL_PERCENTILES` of the channel), and
    optionally each guided round's NSC masks as Labels layers. When the channels
    are first shown, an opaque brightfield layer is dimmed to
    :data:`BRIGHTFIELD_OPACITY` (said in the info line; its data is untouched).
    """

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = real_viewer(napari_viewer)
        self.layer = ComboBox(label="brightfield", choices=self._layer_choices)
        self.model = FileEdit(mode="d", label="model folder (empty: default demo)", value="")
        self.scheduler = ComboBox(value="ddim", choices=list(SCHEDULERS), label="sampler")
        from ..device import device_choices

        gpu = "cuda" in device_choices()
        self.preset = ComboBox(value="paper" if gpu else "fast", choices=list(PRESETS), label="preset",
                               tooltip="fast (chosen on a CPU): 10 DDIM steps, no guidance, a 512x512 plane in "
                               "about 40 s on two cores; paper (chosen on a GPU): DiffStain as published (full "
                               "schedule, mask guidance, DINO ViT-S/8 masks)")
        self.nsc_backbone = ComboBox(value="filters", choices=list(BACKBONES), label="guidance masks",
                                     tooltip="features of the NSC masks that guide sampling (DINO models need "
                                     "their weights: cached or downloaded once)")

        self.device = ComboBox(value="auto", choices=device_choices(), label="device")
        self.show_masks = CheckBox(value=False, text="show each round's masks")
        self.form = ParamsForm(StainParams, key="stain", exclude=("scheduler",))
        self.run_button = PushButton(text="Stain")
        # training
        self.train_data = FileEdit(mode="d", label="paired data folder")
        self.train_out = FileEdit(mode="d", label="new model folder")
        self.train_epochs = SpinBox(value=100, min=1, max=100000, label="epochs")
        self.train_crop = SpinBox(value=64, min=16, max=1024, step=16, label="crop")
        self.train_minutes = FloatSpinBox(value=0.0, min=0.0, max=1e6, label="time budget (min, 0: none)")
        self.train_small = CheckBox(value=True, text="small model (as the demo model; fast on CPU)")
        self.train_resume = CheckBox(value=False, text="resume the model folder's training")
        self.train_button = PushButton(text="Train")
        self.runner = TaskRunner()
        self.info = QLabel("")
        self.info.setWordWrap(True)
        self._cache: dict = {}
        box = QCollapsible("Sampling")
        box.addWidget(self.form.native)
        controls = Container(widgets=[self.layer, self.model, self.preset, self.scheduler, self.nsc_backbone,
                                      self.device, self.show_masks,
                                      self.run_button])
        train_box = QCollapsible("Train a model")
        train_box.addWidget(Container(widgets=[self.train_data, self.train_out, self.train_epochs, self.train_crop,
                                               self.train_minutes, self.train_small, self.train_resume,
                                               self.train_button]).native)
        layout = dock_layout(self, self.runner)
        layout.addWidget(controls.native)
        layout.addWidget(box)
        layout.addWidget(train_box)
        layout.addWidget(self.info)
        layout.addStretch(1)
        self.run_button.changed.connect(self.run)
        self._apply_preset()  # the sampling values start as the chosen preset's
        self.preset.changed.connect(self._apply_preset)
        self.train_button.changed.connect(lambda _value=None: self.train())
        self.runner.busy.connect(self._set_busy)
        self.viewer.layers.events.inserted.connect(self._refresh)
        self.viewer.layers.events.removed.connect(self._refresh)
        on_layer_renamed(self.viewer, self._refresh)

    def _layer_choices(self, _widget=None) -> list:
        """Image layers, focus stacks of 3 planes first (what the models take; the first is chosen)."""
        layers = [layer for layer in image_layers(self.viewer) if not _is_stain_result(layer)]
        stacks = [lay for lay in layers if not lay.rgb and lay.ndim == 3 and int(np.shape(lay.data)[0]) == 3]
        return [(layer.name, layer) for layer in stacks + [lay for lay in layers if lay not in stacks]]

    def _refresh(self, event=None) -> None:
        self.layer.reset_choices()

    def model_path(self) -> str:
        value = str(self.model.value or "").strip()
        return "default" if value in ("", ".") else value

    def _apply_preset(self, name=None) -> None:
        """Set the sampler, sampling values and guidance masks of a preset."""
        params, nsc = stain_preset(self.preset.value if name is None else name)
        self.scheduler.value = params.scheduler
        self.form.set_values(params.to_dict())
        self.nsc_backbone.value = nsc.backbone

    def nsc_params(self) -> NSCParams:
        """NSC settings of mask guidance: the preset's, with the chosen backbone."""
        import dataclasses

        return dataclasses.replace(stain_preset(self.preset.value)[1], backbone=self.nsc_backbone.value)

    def _pipeline(self, path: str, device: str):
        from ..stain.pipeline_stain import load_stain_model

        key = (str(Path(path).resolve()) if path != "default" else path, device)
        if key not in self._cache:
            self._cache = {key: load_stain_model(path, device=device)}
        return self._cache[key]

    def run(self) -> None:
        """Stain the chosen layer in a worker thread."""
        self._refresh()
        layer = self.layer.value
        if layer is None or self.runner.running:
            if layer is None:
                show_error("Choose a brightfield image layer first")
            return
        try:
            params = self.form.params(scheduler=self.scheduler.value)
        except ValueError as exc:
            self.runner.status.setText(f"Error: {exc}")
            show_error(f"Staining parameters: {exc}")
            return
        raw = layer.data  # read and converted in the worker: a large layer never stalls the window
        path, device = self.model_path(), self.device.value
        self.form.save()
        nsc_params = self.nsc_params()

        def work(progress):
            from ..progress import report

            report(progress, "loading the staining model", 0, 1)
            pipe = self._pipeline(path, device)
            report(progress, "loading the staining model", 1, 1)
            planes = np.asarray(raw, dtype=np.float32)
            if planes.ndim == 2:
                planes = np.repeat(planes[None], pipe.config.n_condition, axis=0)
            out = pipe(planes, params=params, nsc_params=nsc_params, progress=progress)
            return pipe, out, [robust_limits(img, *CHANNEL_PERCENTILES) for img in out.images]

        self.runner.start(work, on_done=lambda res: self._show(layer, params, nsc_params, *res),
                          label=f"Staining {layer.name}", detach_on_cancel=True)

    def _set_busy(self, busy: bool) -> None:
        self.run_button.enabled = not busy
        self.train_button.enabled = not busy

    def train(self, *, steps_per_epoch: int = 0) -> None:
        """Train a model on a paired-data folder in a worker thread; it becomes the widget's model."""
        from ..stain.train import TrainConfig
        from ..stain.params import DEMO_MODEL

        data, out = str(self.train_data.value or ""), str(self.train_out.value or "")
        if data in ("", ".") or out in ("", "."):
            show_error("Choose the paired data folder and a new model folder first")
            return
        if self.runner.running:
            return
        try:
            cfg = TrainConfig(epochs=int(self.train_epochs.value), crop=int(self.train_crop.value),
                              minutes=float(self.train_minutes.value), steps_per_epoch=steps_per_epoch,
                              device=self.device.value, lr=3e-4 if self.train_small.value else 8e-5,
                              model=dict(DEMO_MODEL) if self.train_small.value else {})
        except ValueError as exc:
            self.runner.status.setText(f"Error: {exc}")
            return
        resume = bool(self.train_resume.value)

        def work(progress):
            from ..stain.train import train_stain

            return train_stain(data, out, config=cfg, resume=resume, progress=progress)

        def done(res) -> None:
            self.model.value = str(res.out)
            self._cache = {}
            self.info.setText(f"Trained {res.steps} steps ({len(res.losses)} epochs); last loss {res.losses[-1]:.4f}. "
                              "The new model is selected.")
            show_info(f"Model saved in {res.out}")

        self.runner.start(work, on_done=done, label="Training")

    def _show(self, layer, params: StainParams, nsc_params: NSCParams, pipe, out, limits=None):
        guidance = {"nsc": nsc_params.to_dict()} if params.guidance else {}
        meta = provenance("stain.virtual", model=pipe.source, params=params.to_dict(), seed=params.seed,
                          source=layer.name, **guidance)
        names = [stain_layer_name(name, layer.name) for name in out.channel_names]
        dimmed = ""
        if not any(n in self.viewer.layers for n in names) and layer.opacity >= 1.0 and layer.blending != "additive":
            layer.opacity = BRIGHTFIELD_OPACITY  # first channels of this input: brightfield as dim context
            dimmed = (f" {layer.name} is shown at {BRIGHTFIELD_OPACITY:.0%} opacity under the channels "
                      "(raise it in the layer controls).")
        for i, (name, cmap) in enumerate(zip(names, out.colormaps)):
            clim = limits[i] if limits is not None else robust_limits(out.images[i], *CHANNEL_PERCENTILES)
            upsert_layer(self.viewer, name, "image", out.images[i], metadata=meta, like=layer, colormap=cmap,
                         blending="additive", contrast_limits=clim)
            yield  # one layer per event-loop turn
        keep = {round_mask_name(name, r, layer.name) for r in range(1, len(out.masks) + 1) for name in out.channel_names}
        if not self.show_masks.value:
            keep = set()
        for old in [lay for lay in self.viewer.layers if lay.name not in keep]:
            rec = old.metadata.get("cellsynth", {})
            if rec.get("operation") == "stain.guidance_mask" and rec.get("source") == layer.name:
                self.viewer.layers.remove(old)  # masks of an earlier run with more rounds
        if self.show_masks.value:
            for r, masks in enumerate(out.masks, start=1):
                for i, name in enumerate(out.channel_names):
                    upsert_layer(self.viewer, round_mask_name(name, r, layer.name), "labels", masks[i],
                                 metadata=provenance("stain.guidance_mask", round=r, channel=name, source=layer.name,
                                                     backbone=nsc_params.backbone),
                                 like=layer, opacity=0.4, visible=False)
        repeated = ""
        if np.ndim(layer.data) == 2 and pipe.config.n_condition > 1:
            repeated = (f" The 2-D image was repeated into the {pipe.config.n_condition} brightfield planes "
                        "the model expects; give a (planes, rows, cols) image for better results.")
        self.info.setText(f"{len(out.channel_names)} channels from model {pipe.source.get('name')} "
                          f"({params.scheduler}, {out.model_evaluations} model steps"
                          f"{', mask guidance' if params.guidance else ''}).{repeated}{dimmed}")


