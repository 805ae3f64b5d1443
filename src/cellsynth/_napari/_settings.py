"""napari's *Preferences > CellSynth* page and the shared settings file, kept in step.

napari stores a plugin's configuration (the ``configurations`` contribution of
napari.yaml) in its own file; the command line reads :mod:`cellsynth.settings`'
file. When the plugin activates (its first widget, sample or reader), the newer
of the two files wins and is copied into the other; from then on every change
on the Preferences page is written to the shared file at once. Downloads are
asked about with a dialog unless ``download_without_asking`` is set.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from .. import settings as shared

__all__ = ["activate", "sync_with_napari", "PLUGIN", "SECTION"]

PLUGIN = "napari-cellsynth"
SECTION = "general"
_state: dict = {"connected": None, "pushing": False}


def _napari_section() -> tuple[Any, Any]:
    """napari's settings object of this plugin's page and its file, or (None, None) without one."""
    try:
        from napari.settings import get_plugin_settings

        plugin = get_plugin_settings(PLUGIN)
    except Exception:  # napari without plugin settings, or the plugin not registered
        return None, None
    return getattr(plugin, SECTION, None), getattr(plugin, "config_path", None)


def _mtime(path) -> float:
    try:
        return path.stat().st_mtime if path is not None else -1.0
    except OSError:
        return -1.0


def sync_with_napari() -> Optional[str]:
    """Copy the newer of the shared file and napari's page into the other; follow later page edits.

    Returns ``"to napari"``, ``"from napari"`` or None (nothing to sync with).
    """
    section, napari_file = _napari_section()
    if section is None:
        return None
    ours = shared.settings_path()
    names = [f.name for f in dataclasses.fields(shared.Settings)]
    if ours.is_file() and _mtime(ours) >= _mtime(napari_file):
        direction = "to napari"
        values = shared.Settings(**shared._read_file(ours)).to_dict()
        _state["pushing"] = True
        try:
            for name in names:
                try:
                    setattr(section, name, values[name])
                except (ValueError, TypeError):  # e.g. cuda:1, which the page's choice box lacks
                    pass
        finally:
            _state["pushing"] = False
    else:
        direction = "from napari"
        shared.save_settings(**{name: getattr(section, name) for name in names})
    if _state["connected"] is not section:
        section.events.connect(_on_page_changed)
        _state["connected"] = section
    return direction


def _on_page_changed(event) -> None:
    if _state["pushing"]:
        return
    name = getattr(event, "type", None)
    if name in shared.ENV:
        try:
            shared.save_settings(**{name: event.value})
        except (ValueError, TypeError, OSError) as exc:
            from napari.utils.notifications import show_error

            show_error(f"CellSynth settings not saved: {exc}")


def _ask_with_dialog(what: str) -> bool:
    from qtpy.QtWidgets import QMessageBox
    from superqt.utils import ensure_main_thread

    @ensure_main_thread(await_return=True, timeout=24 * 3600 * 1000)
    def ask() -> bool:
        answer = QMessageBox.question(
            None, "Download model weights",
            f"Download {what}?\n\nTurn on 'Download models without asking' in Preferences > CellSynth "
            "to skip this question.")
        return answer == QMessageBox.StandardButton.Yes

    return bool(ask())


def activate(ctx: Any = None) -> None:
    """npe2 ``on_activate`` hook: keep the settings in step and ask before downloads."""
    try:
        sync_with_napari()
    except Exception as exc:  # a broken settings file must not stop the plugin from loading
        from napari.utils.notifications import show_warning

        show_warning(f"CellSynth settings: {exc}")
    shared.set_download_confirmer(_ask_with_dialog)


def start_with_default_counter(model_box, file_box=None) -> None:
    """Set a model choice box (and its model-file field) to the ``default_counter`` setting.

    A name the box offers (``default``, ``classic``, a counter made here) is chosen
    as is; a path to a counter file or folder goes into ``file_box`` with the box
    on ``file``. A bad settings file leaves the box as it was.
    """
    from pathlib import Path

    try:
        name = shared.load_settings().default_counter
    except (ValueError, TypeError):
        return
    values = list(model_box.choices)
    if name in values:
        model_box.value = name
    elif file_box is not None and "file" in values and Path(name).expanduser().exists():
        model_box.value = "file"
        file_box.value = Path(name).expanduser()
        file_box.visible = True
