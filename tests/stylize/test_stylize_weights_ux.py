"""Missing Stable Diffusion weights: a check without network, a Download button, pickers, short messages.

The hub is stood in for: ``HfApi.model_info`` (the size request) and
``snapshot_download`` (driving the tqdm class as the hub does and laying out
its cache). No test touches the network.
"""

import threading
import time
import types

import huggingface_hub
import numpy as np
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.hf_api import RepoSibling

from cellsynth.weights import REGISTRY, WeightsNotFoundError, resolve

SD, CLIP = REGISTRY["sd-v1-4"], REGISTRY["clip-vit-large-patch14"]


def spec_files(spec, size=3000):
    """One small file per pattern of a registry entry (``scheduler/*`` -> ``scheduler/x.json``)."""
    return {pattern.replace("*", "x.json"): bytes([i % 251]) * (size + i) for i, pattern in enumerate(spec.files)}


class FakeHub:
    """The hub: `model_info` answers sizes (or fails like a machine without network), downloads are recorded."""

    def __init__(self, cache_dir, *, reachable=True, chunk=500, delay=0.0):
        self.cache_dir, self.reachable, self.chunk, self.delay = cache_dir, reachable, chunk, delay
        self.downloads, self.info_calls = [], []
        self.specs = {SD.repo_id: SD, CLIP.repo_id: CLIP}

    def install(self, monkeypatch):
        hub = self

        class HfApi:
            def model_info(self, repo_id, *, revision, files_metadata, timeout):
                hub.info_calls.append((repo_id, revision, files_metadata, timeout))
                if not hub.reachable:
                    raise ConnectionError("[Errno -2] Name or service not known")
                files = spec_files(hub.specs[repo_id])
                siblings = [RepoSibling(rfilename=name, size=len(data))
                            for name, data in files.items()]
                siblings.append(RepoSibling(rfilename="sd-v1-4.ckpt", size=4 * 10**9))
                return types.SimpleNamespace(id=repo_id, siblings=siblings)

        monkeypatch.setattr(huggingface_hub, "HfApi", HfApi)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)

    def snapshot_download(self, repo_id, *, revision, allow_patterns, cache_dir, tqdm_class=None,
                          local_files_only=False):
        snapshot = self.cache_dir / ("models--" + repo_id.replace("/", "--")) / "snapshots" / revision
        if local_files_only:
            if not snapshot.is_dir():
                raise LocalEntryNotFoundError("not cached")
            return str(snapshot)
        self.downloads.append(repo_id)
        if not self.reachable:  # what the hub library does offline: retries, here without the waiting
            raise LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known")
        files = spec_files(self.specs[repo_id])
        bar = tqdm_class(total=0, initial=0, unit="B", unit_scale=True, desc="Downloading bytes")
        for data in files.values():  # the total grows as each file starts, as in the hub
            bar.total += len(data)
            for start in range(0, len(data), self.chunk):
                time.sleep(self.delay)
                bar.update(min(self.chunk, len(data) - start))
                bar.refresh()
        bar.close()
        return str(self.make_cache(self.cache_dir, repo_id, revision, files))


@pytest.fixture
def hub(tmp_path, monkeypatch, make_hub_cache):
    """A stand-in hub with an empty cache (the ``cache_dir`` setting), downloads allowed."""
    from cellsynth.settings import save_settings

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    save_settings(cache_dir=str(tmp_path / "cache"))
    fake = FakeHub(tmp_path / "cache")
    fake.make_cache = make_hub_cache
    fake.install(monkeypatch)
    return fake


def sd_folder(root, *, encoder=True):
    """A folder laid out like a diffusers Stable Diffusion pipeline (only what the check looks at)."""
    root.mkdir(parents=True)
    (root / "model_index.json").write_text("{}")
    if encoder:
        (root / "image_encoder").mkdir()
        (root / "image_encoder" / "config.json").write_text("{}")
    return root


# -- library ------------------------------------------------------------------------------------


def test_unreachable_hub_fails_at_once_in_one_sentence(hub):
    hub.reachable = False
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as info:
        resolve("sd-v1-4", progress=lambda p: None)
    elapsed = time.perf_counter() - start
    first = str(info.value).splitlines()[0]
    assert hub.downloads == [], "the download (with the hub library's retries) must not start"
    assert len(hub.info_calls) == 1 and elapsed < 2.0
    assert "huggingface.co cannot be reached (" in first and "'sd-v1-4'" in first and len(first) < 160
    assert "HF_HUB_OFFLINE" not in str(info.value)  # not set here: no advice about it


def test_offline_advice_names_what_turned_downloads_off(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(WeightsNotFoundError) as info:
        resolve("dinov2-small", cache_dir=tmp_path, offline=True)
    assert "offline mode is on" in str(info.value) and "offline=False" in str(info.value)
    assert "HF_HUB_OFFLINE" not in str(info.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="unset HF_HUB_OFFLINE"):
        resolve("dinov2-small", cache_dir=tmp_path)


def test_check_looks_on_this_computer_only(hub, tmp_path):
    from cellsynth.stylize.loading import check_weights
    from cellsynth.weights import check

    hub.reachable = False
    status = check("sd-v1-4")
    assert not status.available and status.downloadable and status.size_bytes == 4270 * 10**6
    assert hub.info_calls == [] and hub.downloads == []
    hub.make_cache(hub.cache_dir, SD.repo_id, SD.revision, spec_files(SD))
    status = check("sd-v1-4")
    assert status.available and status.where == "hub cache" and (status.path / "model_index.json").is_file()

    found = check_weights(sd_folder(tmp_path / "sd"), "clip-vit-large-patch14")
    assert found.ready and found.encoder is None and found.model.where == "folder"
    single = tmp_path / "sd-v1-4.safetensors"
    single.write_bytes(b"x")
    found = check_weights(single, "clip-vit-large-patch14")
    assert found.model.available and found.model.where == "file" and not found.ready
    assert [s.spec.name for s in found.to_download] == ["clip-vit-large-patch14"]
    (tmp_path / "not-sd").mkdir()
    found = check_weights(tmp_path / "not-sd", "clip-vit-large-patch14")
    assert not found.model.available and not found.model.downloadable
    assert found.model.problem == "'not-sd' is not a Stable Diffusion folder (no model_index.json)"
    (tmp_path / "notes.txt").write_text("x")
    found = check_weights(tmp_path / "notes.txt", "clip-vit-large-patch14")
    assert "not a Stable Diffusion checkpoint" in found.model.problem and not found.model.downloadable
    assert hub.info_calls == [] and hub.downloads == []


def test_download_reports_the_size_asked_of_the_hub(open_dock, hub):
    from cellsynth.weights import download

    events = []
    folder = download("sd-v1-4", progress=events.append)
    total = sum(len(d) for d in spec_files(SD).values())
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert {e.total for e in events} == {total}  # fixed from the start, though the hub's counter grows
    steps = [e.step for e in events]
    assert steps == sorted(steps) and steps[-1] == total
    assert "of" in events[-1].message and "kB" in events[-1].message


# -- the dock -----------------------------------------------------------------------------------


def _dock(make_napari_viewer, qtbot, *images):
    viewer = make_napari_viewer()
    for name, meta in images:
        viewer.add_image(np.zeros((16, 16), np.uint8), name=name, metadata=meta)
    _, w = viewer.window.add_plugin_dock_widget("napari-cellsynth", "Stylize (InST)")  # as the Plugins menu does
    qtbot.waitUntil(lambda: w.weights is not None, timeout=10000)  # the check at opening
    return viewer, w


LAYOUT = ("layout", {"cellsynth": {"operation": "layouts.generate"}})
REAL = ("real", {})


def test_dock_checks_the_weights_when_it_opens_and_downloads_them(make_napari_viewer, qtbot, hub):
    hub.delay = 0.002
    viewer, w = _dock(make_napari_viewer, qtbot, REAL, LAYOUT)
    assert "missing (4.3 GB)" in w.weights_label.text() and "missing (1.7 GB)" in w.weights_label.text()
    assert not w.download_button.native.isHidden() and w.download_button.text == "Download (6.0 GB)"
    assert "HF_HUB_OFFLINE" not in w.weights_label.text()
    assert hub.info_calls == [] and hub.downloads == []  # opening asks no network

    # Stylize before the weights are here: one line pointing at Download, nothing started
    w.token_file.value = __file__
    w.run_button.native.click()
    assert "press Download (6.0 GB)" in w.runner.status.text() and not w.runner.running
    assert hub.downloads == []

    events = []
    w.runner._bridge.progress.connect(events.append)
    with qtbot.waitSignal(w.runner.finished, timeout=60000) as blocker:
        w.download_button.native.click()
    assert blocker.args == ["done"], w.runner.status.text()
    assert hub.downloads == [SD.repo_id, CLIP.repo_id]
    totals = {e.stage: e.total for e in events}
    assert totals == {f"download {spec.name}": sum(len(d) for d in spec_files(spec).values())
                      for spec in (SD, CLIP)}
    assert all(e.total for e in events), "the bar must be determinate throughout"
    assert w.weights_label.text().startswith("Weights ready") and w.download_button.native.isHidden()


def test_download_cancel_and_unreachable_hub(make_napari_viewer, qtbot, hub):
    hub.delay, hub.chunk = 0.05, 100  # a slow download
    viewer, w = _dock(make_napari_viewer, qtbot, REAL)
    with qtbot.waitSignal(w.runner.finished, timeout=30000) as blocker:
        w.download_button.native.click()
        qtbot.waitUntil(lambda: w.runner.bar.maximum() > 0 and w.runner.bar.value() > 0, timeout=20000)
        start = time.perf_counter()
        w.runner.cancel_button.click()
    assert blocker.args == ["cancelled"] and time.perf_counter() - start < 1.5
    assert "Download cancelled" in w.runner.status.text()
    assert not w.weights_label.text().startswith("Weights ready") and w.download_button.enabled

    hub.reachable = False
    start = time.perf_counter()
    with qtbot.waitSignal(w.runner.finished, timeout=30000) as blocker:
        w.download_button.native.click()
    assert blocker.args == ["error"] and time.perf_counter() - start < 3.0
    status = w.runner.status.text()
    assert status.startswith("Error: Download of sd-v1-4 failed: huggingface.co cannot be reached (")
    assert "\n" not in status and len(status) < 120
    assert "HF_HUB_OFFLINE" not in status and hub.downloads == [SD.repo_id]  # only the cancelled one


def test_downloads_off_says_so_only_when_hf_hub_offline_is_set(make_napari_viewer, qtbot, hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    viewer, w = _dock(make_napari_viewer, qtbot, REAL)
    assert not w.download_button.enabled and "HF_HUB_OFFLINE is set" in w.weights_label.text()


def test_folder_and_file_pickers(make_napari_viewer, qtbot, hub, tmp_path, monkeypatch):
    from cellsynth._napari import stylize_widget

    folder = sd_folder(tmp_path / "my sd")
    single = tmp_path / "sd-v1-4.ckpt"
    single.write_bytes(b"x")
    asked = []
    monkeypatch.setattr(stylize_widget.QFileDialog, "getExistingDirectory",
                        lambda parent, title, start: asked.append(title) or str(folder))
    monkeypatch.setattr(stylize_widget.QFileDialog, "getOpenFileName",
                        lambda parent, title, start, filt: asked.append(filt) or (str(single), filt))
    viewer, w = _dock(make_napari_viewer, qtbot, REAL)
    w.pick_folder.native.click()
    assert w.model.value == str(folder)
    assert w.weights_label.text() == "Weights ready: Stable Diffusion: folder 'my sd'."
    assert w.download_button.native.isHidden()
    w.pick_file.native.click()
    assert w.model.value == str(single) and "*.safetensors *.ckpt" in asked[-1]
    assert "file 'sd-v1-4.ckpt'" in w.weights_label.text() and "image encoder missing (1.7 GB)" in \
        w.weights_label.text()
    assert w.download_button.text == "Download (1.7 GB)"
    w.pick_encoder.native.click()
    assert w.image_encoder.value == str(folder) and w.weights_label.text().startswith("Weights ready")


def test_style_picker_does_not_default_to_the_content(open_dock, make_napari_viewer, qtbot, hub):
    from cellsynth._napari.stylize_widget import StylizeWidget

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((16, 16), np.uint8), name=REAL[0])
    w = open_dock(viewer, "Stylize (InST)")
    assert w.content.value.name == "real" and w.style.value is None  # one image: no style yet
    viewer.add_image(np.zeros((16, 16), np.uint8), name=LAYOUT[0], metadata=LAYOUT[1])
    assert w.style.value is not None and w.style.value is not w.content.value
    w.content.value = w.style.value  # content switched to the style image: style moves off it
    assert w.style.value is not None and w.style.value is not w.content.value

    viewer.add_image(np.zeros((16, 16), np.uint8), name="real 2")
    w = StylizeWidget(viewer)  # a layout is the content, a real image the style
    assert w.content.value.name == "layout" and w.style.value.name == "real"


def test_weights_check_never_blocks_opening(open_dock, make_napari_viewer, qtbot, hub, monkeypatch):
    """The check at opening runs off the GUI thread: a slow disk does not freeze the window."""
    from cellsynth.stylize import loading

    gate = threading.Event()
    real = loading.check_weights

    def slow(*args, **kwargs):
        gate.wait(5)
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "check_weights", slow)
    from cellsynth._napari.stylize_widget import StylizeWidget

    viewer = make_napari_viewer()
    start = time.perf_counter()
    w = open_dock(viewer, "Stylize (InST)")
    assert time.perf_counter() - start < 2.0 and w.weights is None
    assert w.weights_label.text() == "Checking the weights…"
    gate.set()
    qtbot.waitUntil(lambda: w.weights is not None, timeout=10000)
    assert "missing" in w.weights_label.text()
