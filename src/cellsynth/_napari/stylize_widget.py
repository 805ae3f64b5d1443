"""Dock widget "Stylize (InST)": restyle a layout like a real image with a style token."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, LineEdit, PushButton
from napari.layers import Image
from napari.utils.notifications import show_error
from qtpy.QtCore import QObject, QPointF, QTimer, Signal
from qtpy.QtGui import QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QFileDialog, QLabel, QSizePolicy, QWidget
from superqt import QCollapsible

from ..stylize.params import StylizeParams, TrainParams
from ._layers import on_layer_renamed, provenance, real_viewer, upsert_layer
from ._params import ParamsForm
from ._tasks import TaskRunner, dock_layout

__all__ = ["StylizeWidget", "LossCurve", "result_name", "PREVIEW_SIZE"]

PREVIEW_SIZE = 256
TOKEN_FILE, TOKEN_TRAINED = "token file", "trained from the style layer"


def result_name(content_name: str) -> str:
    """Name of the result layer of a content layer."""
    return f"{content_name} stylized"


class LossCurve(QWidget):
    """A small line plot of training losses (drawn with QPainter)."""

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.losses: list = []
        self.setMinimumHeight(60)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def set_losses(self, losses) -> None:
        self.losses = [float(v) for v in losses]
        self.update()

    def add(self, loss: float) -> None:
        self.losses.append(float(loss))
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt name
        painter = QPainter(self)
        painter.fillRect(self.rect(), self.palette().base())
        values = np.asarray(self.losses, dtype=float)
        if values.size >= 2:
            if values.size > 50:  # running mean so the trend shows through the noise
                k = max(1, values.size // 50)
                values = np.convolve(values, np.ones(k) / k, mode="valid")
            low, high = float(values.min()), float(values.max())
            span = high - low or 1.0
            w, h = self.width() - 4, self.height() - 4
            points = [QPointF(2 + w * i / (len(values) - 1), 2 + h * (1 - (v - low) / span))
                      for i, v in enumerate(values)]
            painter.setPen(QPen(self.palette().text().color(), 1.2))
            painter.drawPolyline(QPolygonF(points))
        painter.end()


class _LossBridge(QObject):
    """Carries losses from the training worker to the GUI thread (queued to the curve's thread)."""

    loss = Signal(float)
    weights = Signal(object, object)  # (what was checked, PipelineWeights) from the weights check thread


#: Wait after the last keystroke in the model fields before checking the weights again.
CHECK_DELAY_MS = 300


def _is_layout(layer) -> bool:
    """A layer made by the layout generator or drawn as a layout (its provenance says so)."""
    meta = getattr(layer, "metadata", None) or {}
    record = meta.get("cellsynth") if isinstance(meta, dict) else None
    return isinstance(record, dict) and str(record.get("operation", "")).startswith("layouts")


class StylizeWidget(QWidget):
    """Stylize a content layer like a style layer with an InST style token.

    Run adds (or updates) the Image layer "<content> stylized", with the
    content's scale/translate and a provenance record. The token comes from a
    file (our token folder's ``token.json``, or an official ``embeddings.pt``)
    or is trained here from the style layer, with a live loss curve.
    """

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        from ..device import device_choices

        self.viewer = real_viewer(napari_viewer)
        self.token = None  # a token trained in this session
        self.content = ComboBox(label="content", choices=self._image_layers)
        self.style = ComboBox(label="style", choices=self._image_layers, nullable=True)
        self.token_source = ComboBox(label="token", choices=[TOKEN_FILE, TOKEN_TRAINED], value=TOKEN_FILE)
        self.token_file = FileEdit(mode="r", label="token file", filter="*.json *.pt")
        self.model = LineEdit(value="sd-v1-4", label="SD model",
                              tooltip="sd-v1-4 (the hub's Stable Diffusion v1.4), a diffusers folder, or a single "
                                      ".safetensors / .ckpt checkpoint")
        self.pick_folder = PushButton(text="Folder…", tooltip="Choose a Stable Diffusion folder (diffusers layout)")
        self.pick_file = PushButton(text="File…", tooltip="Choose a single Stable Diffusion v1 checkpoint "
                                                          "(.safetensors or .ckpt)")
        self.image_encoder = LineEdit(value="clip-vit-large-patch14", label="image encoder",
                                      tooltip="clip-vit-large-patch14 (from the hub) or a CLIP image encoder folder")
        self.pick_encoder = PushButton(text="Folder…", tooltip="Choose a CLIP image encoder folder")
        self.weights_label = QLabel("Checking the weights…")
        self.weights_label.setWordWrap(True)
        self.download_button = PushButton(text="Download", visible=False)
        self.weights: Optional[object] = None  # the last PipelineWeights found
        self.device = ComboBox(label="device", choices=device_choices(), value="auto")
        self.form = ParamsForm(StylizeParams, key="stylize", exclude=("resize", "scheduler"))
        self.resize = ComboBox(label="resize", choices=["keep", "squash"], value="keep")
        self.sampler = ComboBox(label="sampler", choices=["ddim", "dpmsolver++", "unipc"], value="ddim",
                                tooltip="ddim: the paper (50 steps); dpmsolver++ / unipc: about 20 steps suffice")
        self.preview = CheckBox(value=False, text=f"preview (long side {PREVIEW_SIZE} px)")
        self.run_button = PushButton(text="Stylize")
        self.train_form = ParamsForm(TrainParams, key="stylize-train",
                                     exclude=("clip_input", "checkpoint_every", "learning_rate"))
        self.learning_rate = LineEdit(value=str(TrainParams().learning_rate), label="learning rate")
        self.token_out = FileEdit(mode="d", label="save token to")
        self.train_button = PushButton(text="Train token from style layer")
        self.loss_curve = LossCurve()
        self.token_label = QLabel("No trained token")
        self.batch_in = FileEdit(mode="d", label="layout dataset")
        self.batch_out = FileEdit(mode="d", label="output folder")
        self.tolerance = FloatSpinBox(value=0.2, min=0.0, max=100.0, step=0.05, label="QC tolerance",
                                      tooltip="keep images whose relative count drift is at most this")
        self.qc_model = LineEdit(value="default", label="QC counter")
        self.batch_overwrite = CheckBox(value=False, text="replace a dataset made with other settings")
        self.batch_button = PushButton(text="Stylize dataset")
        self.batch_label = QLabel("")
        self.runner = TaskRunner()
        self._bridge = _LossBridge()
        self._bridge.loss.connect(self.loss_curve.add)  # a QObject's method: runs on the GUI thread

        model_row = Container(layout="horizontal", label="SD model", labels=False,
                              widgets=[self.model, self.pick_folder, self.pick_file])
        encoder_row = Container(layout="horizontal", label="image encoder", labels=False,
                                widgets=[self.image_encoder, self.pick_encoder])
        for row in (model_row, encoder_row):
            row.margins = (0, 0, 0, 0)
        top = Container(widgets=[self.content, self.style, self.token_source, self.token_file, model_row,
                                 encoder_row, self.device])
        params_box = QCollapsible("Parameters")
        params_box.addWidget(self.form.native)
        params_box.addWidget(Container(widgets=[self.resize, self.sampler]).native)
        train_box = QCollapsible("Train a token")
        train_box.addWidget(self.train_form.native)
        train_box.addWidget(Container(widgets=[self.learning_rate, self.token_out, self.train_button]).native)
        train_box.addWidget(self.loss_curve)
        train_box.addWidget(self.token_label)
        layout = dock_layout(self, self.runner)
        layout.addWidget(top.native)
        weights_row = Container(layout="horizontal", labels=False, widgets=[self.download_button])
        weights_row.margins = (0, 0, 0, 0)
        layout.addWidget(self.weights_label)
        layout.addWidget(weights_row.native)
        layout.addWidget(params_box)
        layout.addWidget(Container(widgets=[self.preview, self.run_button]).native)
        layout.addWidget(train_box)
        batch_box = QCollapsible("Stylize a layout dataset")
        batch_box.addWidget(Container(widgets=[self.batch_in, self.batch_out, self.tolerance, self.qc_model,
                                               self.batch_overwrite, self.batch_button]).native)
        batch_box.addWidget(self.batch_label)
        layout.addWidget(batch_box)
        layout.addStretch(1)

        self.run_button.changed.connect(self.run)
        self.train_button.changed.connect(self.train)
        self.batch_button.changed.connect(self.stylize_dataset)
        self.download_button.changed.connect(self.download_weights)
        self.pick_folder.changed.connect(lambda: self._pick("folder"))
        self.pick_file.changed.connect(lambda: self._pick("file"))
        self.pick_encoder.changed.connect(lambda: self._pick("encoder"))
        self.runner.busy.connect(self._set_busy)
        self._bridge.weights.connect(self._on_weights_checked)
        self._check_timer = QTimer(self)
        self._check_timer.setSingleShot(True)
        self._check_timer.setInterval(CHECK_DELAY_MS)
        self._check_timer.timeout.connect(self._check_in_background)
        self.model.changed.connect(lambda *_: self._check_timer.start())
        self.image_encoder.changed.connect(lambda *_: self._check_timer.start())
        self.content.changed.connect(self._style_not_content)
        self.viewer.layers.events.inserted.connect(self._refresh)
        self.viewer.layers.events.removed.connect(self._refresh)
        on_layer_renamed(self.viewer, self._refresh)
        self._default_layers()
        self._check_in_background()

    # -- choices -----------------------------------------------------------------

    def _image_layers(self, widget=None) -> list:
        return [layer for layer in self.viewer.layers if isinstance(layer, Image)]

    def _refresh(self, event=None) -> None:
        self.content.reset_choices()
        self.style.reset_choices()
        self._style_not_content()

    def _default_layers(self) -> None:
        """Start on a layout as content (when there is one) and another image as style."""
        layers = self._image_layers()
        layouts = [layer for layer in layers if _is_layout(layer)]
        if layouts:
            self.content.value = layouts[-1]
        self._style_not_content()

    def _style_not_content(self, *_) -> None:
        """Never leave the style picker on the content layer (nor empty while another image exists).

        Prefers an image that is not a layout (a real image), else any other image
        layer, else no style.
        """
        content, style = self.content.value, self.style.value
        if style is not None and style is not content:
            return
        others = [layer for layer in self._image_layers() if layer is not content]
        real = [layer for layer in others if not _is_layout(layer)]
        self.style.value = (real or others or [None])[0]

    # -- weights -----------------------------------------------------------------

    def _weights_args(self) -> tuple:
        return self.model.value.strip(), self.image_encoder.value.strip()

    def check_weights(self):
        """Check the weights now (on this computer only) and show what was found; returns it."""
        from ..stylize.loading import check_weights

        model, encoder = args = self._weights_args()
        found = check_weights(model, encoder)
        self._show_weights(args, found)
        return found

    def _check_in_background(self) -> None:
        """Check the weights off the GUI thread (the first check imports the hub library)."""
        import threading

        args, bridge = self._weights_args(), self._bridge

        def job() -> None:
            from ..stylize.loading import check_weights

            try:
                found = check_weights(*args)
            except Exception as exc:  # a status line must never take the widget down
                found = exc
            try:
                bridge.weights.emit(args, found)
            except RuntimeError:  # the widget was closed meanwhile
                pass

        threading.Thread(target=job, name="cellsynth-weights-check", daemon=True).start()

    def _on_weights_checked(self, args, found) -> None:
        if args != self._weights_args():  # the fields changed since: a newer check is coming
            return
        if isinstance(found, Exception):
            self.weights_label.setText(f"Weights not checked: {found}")
            return
        self._show_weights(args, found)

    def _show_weights(self, args, found) -> None:
        from ..weights import offline_from_env, human_size

        self.weights = found
        text = found.summary()
        self.download_button.visible = bool(found.to_download)
        if found.to_download:
            names = " and ".join(s.spec.name for s in found.to_download)
            self.download_button.text = f"Download ({human_size(found.download_bytes)})"
            if offline_from_env():
                self.download_button.enabled = False
                self.download_button.tooltip = "Downloads are off: HF_HUB_OFFLINE is set"
                text += " Downloads are off (HF_HUB_OFFLINE is set): choose a local folder or file."
            else:
                self.download_button.enabled = not self.runner.running
                self.download_button.tooltip = f"Download {names} from the Hugging Face hub into its cache"
                text += " Download them, or choose a local folder or .safetensors/.ckpt file."
        self.weights_label.setText(text)
        self.weights_label.setToolTip("\n".join(s.problem for s in found.parts if s.problem))

    def _pick(self, what: str) -> None:
        """Ask for a local weights folder or file and use it."""
        field = self.image_encoder if what == "encoder" else self.model
        current = Path(field.value.strip()).expanduser()
        start = str(current if current.is_dir() else current.parent if current.parent.is_dir() else Path.home())
        if what == "file":
            path, _ = QFileDialog.getOpenFileName(self, "Stable Diffusion v1 checkpoint", start,
                                                  "Checkpoints (*.safetensors *.ckpt)")
        else:
            title = "CLIP image encoder folder" if what == "encoder" else "Stable Diffusion folder (diffusers)"
            path = QFileDialog.getExistingDirectory(self, title, start)
        if path:
            field.value = str(path)
            self._check_timer.stop()
            self.check_weights()

    def _weights_missing(self) -> bool:
        """True (and a one-line error shown) when a run would need weights that must be downloaded first.

        A model argument that is wrong in itself (not a Stable Diffusion folder or file,
        an unknown name) is left to the run, whose loader names the exact problem.
        """
        found = self.check_weights()
        if not found.to_download or not (found.model.available or found.model.downloadable):
            return False
        from ..weights import human_size

        names = " and ".join(s.spec.name for s in found.to_download)
        self._error(f"The weights {names} are not on this computer: press Download "
                    f"({human_size(found.download_bytes)}) or choose a local folder or .safetensors/.ckpt file")
        return True

    def download_weights(self) -> None:
        """Download the missing registry weights into the hub cache, with progress and Cancel."""
        found = self.check_weights()
        names = [s.spec.name for s in found.to_download]
        if not names:
            return
        from ..weights import offline_from_env

        if offline_from_env():
            self._error("Downloads are off because HF_HUB_OFFLINE is set; choose a local folder or file instead")
            return

        def work(progress):
            from ..weights import WeightsNotFoundError, download

            paths = []
            for name in names:
                try:
                    paths.append(download(name, progress=progress))
                except WeightsNotFoundError as exc:  # the dock names the weights already: say why, briefly
                    raise WeightsNotFoundError(f"Download of {name} failed: {exc.reason}") from exc
            return paths

        def done(paths) -> None:
            self.check_weights()

        def cancelled(_last) -> str:
            return "Download cancelled: files already complete stay in the hub cache; Download again continues"

        self.runner.start(work, on_done=done, label="Weights", detach_on_cancel=True,
                          cancelled_text=cancelled)

    # -- actions -----------------------------------------------------------------

    def _settings(self) -> Optional[dict]:
        content, style = self.content.value, self.style.value
        if content is None or style is None:
            self._error("Choose a content and a style image layer")
            return None
        try:
            params = self.form.params(resize=self.resize.value, scheduler=self.sampler.value)
            if self.preview.value:
                params = StylizeParams(**{**params.to_dict(), "size": min(params.size or PREVIEW_SIZE, PREVIEW_SIZE)})
        except (TypeError, ValueError) as exc:
            self._error(f"Stylize parameters: {exc}")
            return None
        return {"content": content, "style": style, "params": params, "model": self.model.value.strip(),
                "image_encoder": self.image_encoder.value.strip(), "device": self.device.value}

    def run(self) -> None:
        """Stylize the content layer in a worker; add or update its result layer when done."""
        s = self._settings()
        token_spec = self._token_spec() if s is not None else None
        if token_spec is None or self._weights_missing():
            return
        content_layer, style_layer = s["content"], s["style"]
        content, style = np.asarray(content_layer.data), np.asarray(style_layer.data)
        self.form.save()

        def work(progress):
            from ..stylize.loading import load_pipeline
            from ..stylize.official import read_token

            token = token_spec if not isinstance(token_spec, Path) else read_token(token_spec)
            pipe = load_pipeline(s["model"], image_encoder=s["image_encoder"], device=s["device"], progress=progress)
            return pipe(content, style, token, params=s["params"], progress=progress)

        def done(out) -> None:
            from ..stylize.loading import model_record

            meta = provenance("stylize.inst", **model_record(s["model"]), content_layer=content_layer.name,
                              style_layer=style_layer.name, preview=bool(self.preview.value),
                              **{k: v for k, v in out.metadata.items() if k != "operation"})
            kwargs = {"colormap": "gray"} if out.image.ndim == 2 else {"rgb": True}
            layer = upsert_layer(self.viewer, result_name(content_layer.name), "image", out.image, metadata=meta,
                                 like=content_layer, **kwargs)
            if out.image.ndim == 2:
                layer.contrast_limits = _limits(out.image)

        self.runner.start(work, on_done=done, label="Stylizing")

    def _token_spec(self):
        """The trained token, or the path of the token file; None (and an error shown) when missing."""
        if self.token_source.value == TOKEN_TRAINED:
            if self.token is None:
                self._error("No token trained yet: train one from the style layer, or choose a token file")
                return None
            return self.token
        path = Path(str(self.token_file.value))
        if not str(self.token_file.value) or not path.exists() or path.is_dir() and not (path / "token.json").exists():
            self._error("Stylizing needs a style token: choose a token file (a token folder's token.json, or an "
                        "official embeddings.pt), or train one from the style layer under 'Train a token' (a few "
                        "minutes on a GPU; it needs the Stable Diffusion and image encoder weights, 6 GB, "
                        "downloaded once)")
            return None
        return path

    def stylize_dataset(self) -> None:
        """Stylize a layout dataset folder into a new folder (resumable), with count QC; adds no layers."""
        s = self._settings()
        token_spec = self._token_spec() if s is not None else None
        if token_spec is None or self._weights_missing():
            return
        src, dst = str(self.batch_in.value).strip(), str(self.batch_out.value).strip()
        if src in ("", ".") or dst in ("", "."):
            self._error("Choose the layout dataset folder and an output folder")
            return
        style = np.asarray(s["style"].data)
        tolerance, qc_model = float(self.tolerance.value), self.qc_model.value.strip()
        overwrite = bool(self.batch_overwrite.value)

        def work(progress):
            from ..io import read_json
            from ..stylize.dataset import stylize_dataset
            from ..stylize.loading import load_pipeline
            from ..stylize.official import read_token

            token = token_spec if not isinstance(token_spec, Path) else read_token(token_spec)
            pipe = load_pipeline(s["model"], image_encoder=s["image_encoder"], device=s["device"], progress=progress)
            manifest = stylize_dataset(src, dst, pipe=pipe, token=token, style=style, params=s["params"],
                                       tolerance=tolerance, qc_model=qc_model, overwrite=overwrite, progress=progress)
            return read_json(manifest).get("qc", {})

        def done(qc) -> None:
            self.batch_label.setText(f"{qc.get('kept', 0)} kept, {qc.get('rejected', 0)} rejected "
                                     f"(mean |count drift| {qc.get('mean_abs_drift', 0.0):.1%}) in {dst}")

        self.runner.start(work, on_done=done, label="Stylizing dataset")

    def train(self) -> None:
        """Train a token from the style layer in a worker, drawing the loss curve."""
        style_layer = self.style.value
        if style_layer is None:
            self._error("Choose a style image layer to train from")
            return
        try:
            try:
                lr = float(self.learning_rate.value)
            except ValueError:
                raise ValueError(f"learning rate must be a number, got {self.learning_rate.value!r}") from None
            params = self.train_form.params(learning_rate=lr)
        except (TypeError, ValueError) as exc:
            self._error(f"Training parameters: {exc}")
            return
        if self._weights_missing():
            return
        style = np.asarray(style_layer.data)
        model, encoder, device = self.model.value.strip(), self.image_encoder.value.strip(), self.device.value
        out_dir = str(self.token_out.value).strip()
        out_dir = Path(out_dir) if out_dir not in ("", ".") else None
        self.loss_curve.set_losses([])
        bridge = self._bridge
        self.train_form.save()

        def work(progress):
            from ..stylize.loading import load_pipeline
            from ..stylize.tokens import save_token
            from ..stylize.train import train_token

            pipe = load_pipeline(model, image_encoder=encoder, device=device, progress=progress)
            result = train_token([style], pipe, params=params, encoder=encoder, progress=progress,
                                 checkpoint_dir=None if out_dir is None else out_dir / "checkpoint",
                                 on_step=lambda step, loss: bridge.loss.emit(loss))
            if out_dir is not None:
                save_token(result.token, out_dir, overwrite=True)
            return result

        def done(result) -> None:
            self.token = result.token
            self.token_source.value = TOKEN_TRAINED
            self.loss_curve.set_losses(result.losses)
            where = f", saved to {out_dir}" if out_dir is not None else ""
            self.token_label.setText(f"Token trained on '{style_layer.name}': final loss "
                                     f"{result.token.training['final_loss']:.4f}{where}")

        self.runner.start(work, on_done=done, label="Training token")

    # -- helpers -----------------------------------------------------------------

    def _error(self, message: str) -> None:
        self.runner.status.setText(f"Error: {message}")
        show_error(message)

    def _set_busy(self, busy: bool) -> None:
        for w in (self.run_button, self.train_button, self.batch_button, self.download_button):
            w.enabled = not busy
        if not busy and self.weights is not None:
            self._show_weights(self._weights_args(), self.weights)  # the Download button's own state


def _limits(image: np.ndarray) -> tuple:
    if image.dtype == np.uint8:
        return (0, 255)
    low, high = float(image.min()), float(image.max())
    return (low, high if high > low else low + 1)
