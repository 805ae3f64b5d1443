"""Settings shared by the CLI, the library and napari: environment over file over defaults, honoured by
device resolution, the weights resolver (cache folder, asking before downloads) and `cellsynth count`."""

import json

import pytest

from cellsynth import settings as shared
from cellsynth.cli import main
from cellsynth.settings import Settings, load_settings, save_settings, setting_sources, settings_path


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for var in list(shared.ENV.values()) + ["CELLSYNTH_SETTINGS"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CELLSYNTH_CONFIG_DIR", str(tmp_path / "config"))
    previous = shared.set_download_confirmer(None)
    yield
    shared.set_download_confirmer(previous)


def test_environment_over_file_over_defaults(monkeypatch, tmp_path):
    assert load_settings() == Settings()
    assert settings_path() == tmp_path / "config" / "settings.json"
    save_settings(device="cpu", default_counter="classic")
    assert json.loads(settings_path().read_text()) == {"device": "cpu", "default_counter": "classic"}
    monkeypatch.setenv("CELLSYNTH_COUNTER", "/models/mine.zip")
    monkeypatch.setenv("CELLSYNTH_DOWNLOAD", "yes")
    s = load_settings()
    assert (s.device, s.default_counter, s.download_without_asking) == ("cpu", "/models/mine.zip", True)
    src = setting_sources()
    assert src["device"][1] == str(settings_path()) and src["default_counter"][1] == "CELLSYNTH_COUNTER"
    assert src["cache_dir"] == ("", "default")
    other = tmp_path / "elsewhere.json"
    monkeypatch.setenv("CELLSYNTH_SETTINGS", str(other))
    assert load_settings().device == "auto"  # a different file, nothing in it


def test_bad_settings_name_their_origin(monkeypatch):
    monkeypatch.setenv("CELLSYNTH_DEVICE", "tpu")
    with pytest.raises(ValueError, match="device must be .* got 'tpu' .*from CELLSYNTH_DEVICE"):
        load_settings()
    monkeypatch.delenv("CELLSYNTH_DEVICE")
    settings_path().parent.mkdir(parents=True)
    settings_path().write_text('{"colour": "blue"}')
    with pytest.raises(ValueError, match="unknown settings \\['colour'\\]"):
        load_settings()
    settings_path().write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        load_settings()
    settings_path().unlink()
    monkeypatch.setenv("CELLSYNTH_DOWNLOAD", "maybe")
    with pytest.raises(ValueError, match="CELLSYNTH_DOWNLOAD: download_without_asking must be true or false"):
        load_settings()


def test_device_auto_follows_the_setting(monkeypatch):
    from cellsynth.device import resolve_device

    monkeypatch.setenv("CELLSYNTH_DEVICE", "cpu")
    assert resolve_device("auto").type == "cpu"
    monkeypatch.setenv("CELLSYNTH_DEVICE", "cuda:7")
    with pytest.raises(ValueError):  # no such GPU here: refused clearly, never silently elsewhere
        resolve_device("auto")
    assert resolve_device("cpu").type == "cpu"  # an explicit device is not overridden


def test_weights_resolver_uses_the_cache_folder_and_asks_before_downloading(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from cellsynth.weights import WeightsNotFoundError, resolve

    calls = []

    def snapshot_download(repo_id, **kw):  # the hub, recorded: nothing is cached, downloads "succeed"
        calls.append(kw)
        if kw.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        raise OSError("network disabled in tests")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    save_settings(cache_dir=str(tmp_path / "cache"))
    asked = []
    shared.set_download_confirmer(lambda what: asked.append(what) or False)
    with pytest.raises(WeightsNotFoundError, match="declined"):
        resolve("dinov2-small", offline=False)
    assert calls[0]["cache_dir"] == str(tmp_path / "cache") and len(calls) == 1  # no download attempted
    assert "facebook/dinov2-small" in asked[0] and "MB" in asked[0]
    save_settings(download_without_asking=True)
    with pytest.raises(WeightsNotFoundError, match="download failed"):
        resolve("dinov2-small", offline=False)
    assert len(asked) == 1 and not calls[-1].get("local_files_only")  # went ahead without asking


def test_cli_count_uses_the_default_counter_setting(tmp_path, capsys):
    from cellsynth.io import write_tiff
    from cellsynth.layouts import LayoutParams, generate_layout

    lay = generate_layout(LayoutParams(shape=(64, 64), count_mean=8, count_std=0), rng=0)
    img = tmp_path / "x.tif"
    write_tiff(img, lay.image)
    assert main(["settings", "--set", "default_counter=classic"]) == 0
    capsys.readouterr()
    assert main(["count", str(img), "--diameter", "15", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "classic"
    assert main(["settings", "--set", "colour=blue"]) == 2
    assert "--set expects NAME=VALUE" in capsys.readouterr().err
    assert main(["settings", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["settings"]["default_counter"] == {"value": "classic", "source": str(settings_path())}


def test_count_widget_starts_with_the_default_counter_setting(open_dock, make_napari_viewer, monkeypatch, tmp_path):
    from cellsynth._napari.count_widget import CountWidget

    viewer = make_napari_viewer()
    monkeypatch.setenv("CELLSYNTH_COUNTER", "classic")
    assert open_dock(viewer, "Count cells").model.value == "classic"
    package = tmp_path / "mine.zip"
    package.write_bytes(b"")
    monkeypatch.setenv("CELLSYNTH_COUNTER", str(package))
    w = CountWidget(viewer)
    assert w.model.value == "file" and str(w.model_file.value) == str(package)
    assert not w.model_file.native.isHidden()  # the file field is shown with it
    monkeypatch.setenv("CELLSYNTH_COUNTER", str(tmp_path / "gone.zip"))
    assert CountWidget(viewer).model.value == "default"  # a counter that is not there: the shipped one
