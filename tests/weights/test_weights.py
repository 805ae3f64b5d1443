import hashlib
import os
import re

import huggingface_hub
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from cellsynth import weights
from cellsynth.progress import Cancelled
from cellsynth.weights import (
    REGISTRY,
    ModelSpec,
    WeightsNotFoundError,
    file_sha256,
    resolve,
    resources_dir,
)

DINO = REGISTRY["dinov2-small"]
FILES = {
    "config.json": b'{"model_type": "dinov2"}',
    "model.safetensors": b"\0" * 5000,
    "preprocessor_config.json": b"{}",
}


@pytest.fixture
def no_download(monkeypatch):
    """Fail the test if the resolver asks the hub to download anything."""
    real = huggingface_hub.snapshot_download

    def guarded(repo_id, **kwargs):
        if not kwargs.get("local_files_only"):
            pytest.fail(f"download attempted for {repo_id}")
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", guarded)


@pytest.fixture
def online(monkeypatch, no_download):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_registry_entries_are_pinned():
    assert set(REGISTRY) == {"sd-v1-4", "clip-vit-large-patch14", "dinov2-small", "dino-vits8",
                             "efficientnet_b0-imagenet"}
    for name, spec in REGISTRY.items():
        assert spec.name == name
        if name in ("efficientnet_b0-imagenet", "dino-vits8"):  # no commit could be verified: the branch
            assert spec.revision == "main" and "unverified" in spec.description
            continue
        assert re.fullmatch(r"[0-9a-f]{40}", spec.revision), name
        assert spec.files and spec.size_mb > 0 and spec.bundled is None
    assert REGISTRY["sd-v1-4"].repo_id == "CompVis/stable-diffusion-v1-4"
    assert "unet/diffusion_pytorch_model.safetensors" in REGISTRY["sd-v1-4"].files
    assert REGISTRY["dino-vits8"].repo_id == "timm/vit_small_patch8_224.dino"
    assert {s.licence for s in REGISTRY.values()} == {"creativeml-openrail-m", "mit", "apache-2.0"}


def test_model_spec_validation():
    with pytest.raises(ValueError, match="repo_id"):
        ModelSpec("x", "", "", ("a",), "mit", 1, "no source")
    with pytest.raises(ValueError, match="files"):
        ModelSpec("x", "org/x", "main", "config.json", "mit", 1, "files as a str")
    spec = ModelSpec("x", "", "", ["a.bin"], "mit", 1, "bundled", bundled="x")
    assert spec.files == ("a.bin",)


def test_explicit_folder_and_file_win(tmp_path, online):
    folder = tmp_path / "my model"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(b"x")
    assert resolve(folder) == folder.resolve()
    assert resolve(str(folder)) == folder.resolve()
    assert resolve(folder / "weights.safetensors") == (folder / "weights.safetensors").resolve()


def test_folder_named_like_a_model_must_hold_its_files(tmp_path, online):
    folder = tmp_path / "dinov2-small"
    folder.mkdir()
    (folder / "config.json").write_bytes(b"{}")
    missing = "lacks model.safetensors, preprocessor_config.json"
    with pytest.raises(WeightsNotFoundError, match=missing):
        resolve(folder)
    for rel, data in FILES.items():
        (folder / rel).write_bytes(data)
    assert resolve(folder) == folder.resolve()


def test_unknown_name_lists_registry(online):
    with pytest.raises(ValueError, match="unknown model 'sd-v9'") as info:
        resolve("sd-v9")
    for name in REGISTRY:
        assert name in str(info.value)


@pytest.fixture
def tiny_bundled(tmp_path, monkeypatch):
    spec = ModelSpec("tiny-counter", "", "", ("config.json", "*.safetensors"), "mit", 0.1,
                     "test model", bundled="models/tiny-counter")
    monkeypatch.setitem(REGISTRY, spec.name, spec)
    monkeypatch.setattr(weights, "resources_dir", lambda: tmp_path / "resources")
    return tmp_path / "resources" / "models" / "tiny-counter"


def test_bundled_entry_resolves_without_hub(tiny_bundled, online):
    tiny_bundled.mkdir(parents=True)
    (tiny_bundled / "config.json").write_text("{}")
    (tiny_bundled / "model.safetensors").write_bytes(b"x")
    assert resolve("tiny-counter") == tiny_bundled


def test_bundled_entry_missing_is_an_error(tiny_bundled, online):
    with pytest.raises(WeightsNotFoundError, match="bundled weights for model 'tiny-counter'"):
        resolve("tiny-counter")
    tiny_bundled.mkdir(parents=True)
    (tiny_bundled / "config.json").write_text("{}")
    with pytest.raises(WeightsNotFoundError, match=r"lack \*\.safetensors"):
        resolve("tiny-counter")


def test_hub_cache_is_found_offline(tmp_path, monkeypatch, no_download, make_hub_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = make_hub_cache(tmp_path, DINO.repo_id, DINO.revision, FILES)
    make_hub_cache(tmp_path, DINO.repo_id, "0" * 40, FILES)  # another revision: not ours
    found = resolve("dinov2-small", cache_dir=tmp_path)
    assert found == snapshot
    assert (found / "model.safetensors").read_bytes() == FILES["model.safetensors"]


def test_offline_without_cache_explains_how_to_provide(tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as info:
        resolve("dinov2-small", cache_dir=tmp_path)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for needle in ("'dinov2-small'", DINO.repo_id, DINO.revision, *DINO.files,
                   "download", "--local-dir", "HF_HUB_OFFLINE", "local folder"):
        assert needle in message


def test_offline_argument_and_incomplete_cache(tmp_path, online, make_hub_cache):
    make_hub_cache(tmp_path, DINO.repo_id, DINO.revision, {"config.json": b"{}"})
    with pytest.raises(WeightsNotFoundError, match="offline mode is on"):
        resolve("dinov2-small", cache_dir=tmp_path, offline=True)


def fake_download(cache_dir, make_hub_cache, *, nbytes, fail=None):
    """A stand-in for snapshot_download that drives tqdm_class like the hub does."""
    calls = []

    def snapshot_download(repo_id, *, revision, allow_patterns, cache_dir, tqdm_class=None,
                          local_files_only=False):
        calls.append(local_files_only)
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        assert revision == DINO.revision and allow_patterns == list(DINO.files)
        files_bar = tqdm_class(total=len(FILES), desc="Fetching 3 files")
        bytes_bar = tqdm_class(total=nbytes, initial=0, unit="B", unit_scale=True,
                               desc="Downloading bytes")
        written_bar = tqdm_class(total=2 * nbytes, unit="B", desc="Reconstructing")
        for start in range(0, nbytes, 1000):
            bytes_bar.update(min(1000, nbytes - start))
            written_bar.update(1)
        if fail is not None:
            raise fail
        files_bar.update(len(FILES))
        files_bar.close()
        bytes_bar.set_description_str("Download complete")
        return str(make_hub_cache(cache_dir, repo_id, revision, FILES))

    return snapshot_download, calls


def test_download_reports_byte_progress(tmp_path, monkeypatch, make_hub_cache):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    nbytes = sum(len(data) for data in FILES.values())
    fake, calls = fake_download(tmp_path, make_hub_cache, nbytes=nbytes)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    events = []
    found = resolve("dinov2-small", cache_dir=tmp_path, progress=events.append)
    assert calls == [True, False]
    assert (found / "config.json").read_bytes() == FILES["config.json"]
    assert events, "no progress events"
    assert {e.stage for e in events} == {"download dinov2-small"}
    assert {e.total for e in events} == {nbytes}  # only the first byte counter is forwarded
    steps = [e.step for e in events]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == nbytes


def test_network_error_becomes_weights_not_found(tmp_path, monkeypatch, make_hub_cache):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    error = ConnectionError("Name or service not known")
    fake, _ = fake_download(tmp_path, make_hub_cache, nbytes=3000, fail=error)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(WeightsNotFoundError, match="download failed") as info:
        resolve("dinov2-small", cache_dir=tmp_path, progress=lambda p: None)
    assert info.value.__cause__ is error
    assert DINO.repo_id in str(info.value) and "model.safetensors" in str(info.value)


def test_cancel_during_download_propagates(tmp_path, monkeypatch, make_hub_cache):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    fake, _ = fake_download(tmp_path, make_hub_cache, nbytes=3000)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)

    def cancel(progress):
        raise Cancelled()

    with pytest.raises(Cancelled):
        resolve("dinov2-small", cache_dir=tmp_path, progress=cancel)

    # tqdm's process-wide lock must be free again: a bar made in another thread
    # (as a later napari worker would) must not wait for it
    import io
    import threading

    from tqdm.std import tqdm

    got = []
    t = threading.Thread(target=lambda: got.append(tqdm(total=1, file=io.StringIO()).close() is None),
                         daemon=True)
    t.start()
    t.join(10)
    assert got == [True], "tqdm's lock is still held after a cancelled download"


def test_file_sha256_streams(tmp_path):
    data = os.urandom(10_000)
    path = tmp_path / "w.bin"
    path.write_bytes(data)
    assert file_sha256(path, chunk_size=1024) == hashlib.sha256(data).hexdigest()


def test_resources_dir_is_the_shipped_folder():
    root = resources_dir()
    assert root.name in {"resources", "_resources"}
    assert root.is_dir()
