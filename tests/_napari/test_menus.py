"""The plugin's napari menus and settings page: the manifest validates, every widget is found under its
napari menu (and under Plugins > CellSynth) and opens from there, and the Preferences page holds the settings."""

import subprocess
import sys
from pathlib import Path

import pytest

PLUGIN = "napari-cellsynth"
#: widget command -> the napari menu a person looks in for it.
EXPECTED = {
    "napari-cellsynth.layouts_widget": "napari/file/new_layer",
    "napari-cellsynth.count_widget": "napari/layers/measure",
    "napari-cellsynth.loop_widget": "napari/layers/measure",
    "napari-cellsynth.nsc_widget": "napari/layers/segment",
    "napari-cellsynth.stylize_widget": "napari/layers/filter",
    "napari-cellsynth.stain_widget": "napari/layers/filter",
}


def test_npe2_validate_passes_with_menus_and_configurations():
    exe = Path(sys.executable).with_name("npe2")
    res = subprocess.run([str(exe), "validate", PLUGIN], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "valid" in res.stdout, res.stdout + res.stderr
    from npe2 import PluginManifest

    mf = PluginManifest.from_distribution(PLUGIN)
    widgets = {w.command for w in mf.contributions.widgets}
    assert set(EXPECTED) == widgets  # every widget has a menu, and no menu names a missing one
    menus = {item.command: menu for menu, items in mf.contributions.menus.items() for item in items}
    assert menus == EXPECTED
    from napari._app_model.constants._menus import is_menu_contributable

    assert all(is_menu_contributable(m) for m in menus.values())
    assert set(mf.contributions.configurations["general"].properties) == {
        "device", "cache_dir", "default_counter", "download_without_asking"}


def _menu_commands(app, menu_id: str) -> set:
    return {getattr(getattr(item, "command", None), "id", None) for item in app.menus.get_menu(menu_id)}


def test_each_widget_is_under_its_menu_and_opens_from_it(make_napari_viewer, qtbot):
    from napari._app_model import get_app_model

    viewer = make_napari_viewer()
    app = get_app_model()
    for command, menu in EXPECTED.items():
        assert command in _menu_commands(app, menu), f"{command} not in {menu}"
    plugins_menu = [i for i in app.menus.get_menu("napari/plugins") if getattr(i, "submenu", None)]
    sub = next(i.submenu for i in plugins_menu if i.title == "CellSynth")
    assert set(EXPECTED) <= _menu_commands(app, sub)
    # a person picks Layers > Measure > Count cells: the dock widget opens
    app.commands.execute_command("napari-cellsynth.count_widget")
    docks = viewer.window.dock_widgets
    assert any("Count cells" in name for name in docks), list(docks)


def test_preferences_page_holds_the_settings_and_writes_the_shared_file(plugin_settings, npe2pm, monkeypatch,
                                                                        tmp_path):
    import json

    from napari.settings import get_plugin_settings
    from npe2 import PluginManifest

    from cellsynth import settings as shared
    from cellsynth._napari import _settings

    monkeypatch.setenv("CELLSYNTH_SETTINGS", str(tmp_path / "settings.json"))
    npe2pm.register(PluginManifest.from_distribution(PLUGIN))  # napari's settings fixture: no discovery
    page = get_plugin_settings(PLUGIN).general
    assert (page.device, page.cache_dir, page.default_counter, page.download_without_asking) == (
        "auto", "", "default", False)
    assert _settings.sync_with_napari() == "from napari"  # no shared file yet: napari's page is the source
    page.device = "cpu"  # a person changes it on the Preferences page
    page.download_without_asking = True
    assert json.loads((tmp_path / "settings.json").read_text()) == {"device": "cpu", "download_without_asking": True}
    assert shared.load_settings().device == "cpu"
    with pytest.raises(Exception):
        page.device = "tpu"  # not offered, refused by the page
    # the command line changed the shared file later: activation copies it onto the page
    shared.save_settings(default_counter="classic", device="auto")
    import os
    import time

    later = time.time() + 5
    os.utime(tmp_path / "settings.json", (later, later))
    assert _settings.sync_with_napari() == "to napari"
    assert page.default_counter == "classic" and page.device == "auto"
