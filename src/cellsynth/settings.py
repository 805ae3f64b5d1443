"""Settings shared by the command line, the library and napari.

Four settings, each from (first found wins) its environment variable, the
settings file, or its default:

=========================  ===========================  =========================================
setting                    environment variable         meaning (default)
=========================  ===========================  =========================================
``device``                 ``CELLSYNTH_DEVICE``         what ``device="auto"`` means: ``auto``
                                                        (CUDA, else Apple MPS, else CPU), ``cpu``,
                                                        ``cuda``, ``cuda:N`` or ``mps``
``cache_dir``              ``CELLSYNTH_CACHE_DIR``      folder for downloaded model weights
                                                        (empty: the Hugging Face hub's cache)
``default_counter``        ``CELLSYNTH_COUNTER``        the counter ``cellsynth count`` and the
                                                        Count cells widget start with
                                                        (``default``: the shipped one)
``download_without_asking``  ``CELLSYNTH_DOWNLOAD``     download missing model weights without
                                                        asking first (``false``)
=========================  ===========================  =========================================

The settings file is ``settings.json`` in the user config folder
(``$CELLSYNTH_CONFIG_DIR`` or the platform's, e.g. ``~/.config/cellsynth``), or
the file ``$CELLSYNTH_SETTINGS`` names. napari's *Preferences > CellSynth* page
edits the same values (the plugin keeps that page and this file in step), and
``cellsynth settings`` shows or sets them from the command line.

Examples
--------
>>> s = Settings(device="cpu")
>>> s.device, s.default_counter, s.download_without_asking
('cpu', 'default', False)
>>> Settings(device="tpu")
Traceback (most recent call last):
...
ValueError: settings: device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'tpu'
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["Settings", "ENV", "config_dir", "load_settings", "save_settings", "settings_path", "setting_sources",
           "confirm_download", "set_download_confirmer"]

#: Setting name -> environment variable.
ENV = {
    "device": "CELLSYNTH_DEVICE",
    "cache_dir": "CELLSYNTH_CACHE_DIR",
    "default_counter": "CELLSYNTH_COUNTER",
    "download_without_asking": "CELLSYNTH_DOWNLOAD",
}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Settings:
    """The settings, validated.

    Parameters
    ----------
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
    cache_dir : str
        Folder for downloaded weights; ``""`` for the Hugging Face hub's default.
    default_counter : str
        ``"default"``, ``"classic"`` or a counter path (folder, file or bioimage.io ``.zip``).
    download_without_asking : bool
        Download missing weights without a question first.
    """

    device: str = "auto"
    cache_dir: str = ""
    default_counter: str = "default"
    download_without_asking: bool = False

    def __post_init__(self) -> None:
        dev = str(self.device).strip().lower()
        if not _DEVICE.match(dev):
            raise ValueError(f"settings: device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {self.device!r}")
        object.__setattr__(self, "device", dev)
        if not isinstance(self.cache_dir, str):
            raise TypeError(f"settings: cache_dir must be a folder path (text), got {type(self.cache_dir).__name__}")
        if not isinstance(self.default_counter, str) or not self.default_counter.strip():
            raise ValueError(f"settings: default_counter must be 'default', 'classic' or a counter path, "
                             f"got {self.default_counter!r}")
        if not isinstance(self.download_without_asking, bool):
            raise TypeError("settings: download_without_asking must be true or false, "
                            f"got {self.download_without_asking!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_dir() -> Path:
    """Folder for settings: ``$CELLSYNTH_CONFIG_DIR`` or the platform's user config folder."""
    env = os.environ.get("CELLSYNTH_CONFIG_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_config_dir("cellsynth"))


def settings_path() -> Path:
    """The settings file: ``$CELLSYNTH_SETTINGS``, else ``settings.json`` in the user config folder."""
    env = os.environ.get("CELLSYNTH_SETTINGS")
    return Path(env).expanduser() if env else config_dir() / "settings.json"


def _parse(name: str, value: Any, where: str) -> Any:
    if name == "download_without_asking" and isinstance(value, str):
        v = value.strip().lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
        raise ValueError(f"{where}: {name} must be true or false, got {value!r}")
    if name == "cache_dir" and value is None:
        return ""
    return value


def _read_file(path: Path) -> dict:
    if path.exists() and not path.is_file():
        raise ValueError(f"settings file {path} is a folder, not a file; expected a JSON file of settings "
                         "(set CELLSYNTH_SETTINGS to a file, or remove the folder)")
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"settings file {path} is not readable JSON ({exc}); fix or delete it") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"settings file {path} must hold a JSON object of settings")
    unknown = sorted(set(doc) - set(ENV))
    if unknown:
        raise ValueError(f"settings file {path} has unknown settings {unknown}; expected some of {sorted(ENV)}")
    return {k: _parse(k, v, f"settings file {path}") for k, v in doc.items()}


def setting_sources() -> dict:
    """For each setting, ``(value, source)`` where source is the variable, the file or ``"default"``."""
    path = settings_path()
    from_file = _read_file(path)
    out = {}
    for f in dataclasses.fields(Settings):
        env = os.environ.get(ENV[f.name])
        if env is not None:
            out[f.name] = (_parse(f.name, env, f"environment variable {ENV[f.name]}"), ENV[f.name])
        elif f.name in from_file:
            out[f.name] = (from_file[f.name], str(path))
        else:
            out[f.name] = (f.default, "default")
    return out


def load_settings() -> Settings:
    """The current settings (environment variables over the settings file over the defaults).

    Raises
    ------
    ValueError
        An unreadable settings file, an unknown setting or a bad value (the
        message names the variable or the file it came from).
    """
    sources = setting_sources()
    try:
        return Settings(**{k: v for k, (v, _) in sources.items()})
    except (ValueError, TypeError) as exc:
        origins = ", ".join(sorted({src for _, src in sources.values() if src != "default"}))
        raise ValueError(f"{exc} (from {origins})") from exc


def save_settings(**changes: Any) -> Settings:
    """Change settings in the settings file (validated first; values equal to the default are dropped).

    Returns the settings now in the file (environment variables not applied).
    """
    path = settings_path()
    current = _read_file(path)
    current.update({k: _parse(k, v, "settings") for k, v in changes.items()})
    unknown = sorted(set(current) - set(ENV))
    if unknown:
        raise ValueError(f"unknown settings {unknown}; expected some of {sorted(ENV)}")
    settings = Settings(**current)
    defaults = Settings()
    doc = {k: v for k, v in settings.to_dict().items() if v != getattr(defaults, k)}
    from .io import write_json

    write_json(path, doc, overwrite=True)
    return settings


_confirmer: Optional[Callable[[str], bool]] = None


def set_download_confirmer(func: Optional[Callable[[str], bool]]) -> Optional[Callable[[str], bool]]:
    """Install the function that asks a person before a download (returns the previous one).

    It gets one line describing the download and returns True to go ahead. The
    command line asks on its terminal; napari asks with a dialog.
    """
    global _confirmer
    previous, _confirmer = _confirmer, func
    return previous


def confirm_download(what: str) -> bool:
    """True when a download of ``what`` may go ahead.

    Yes without a question when ``download_without_asking`` is set or when no
    one can be asked (no confirmer installed: scripts and library use);
    otherwise the installed confirmer's answer.
    """
    if load_settings().download_without_asking or _confirmer is None:
        return True
    return bool(_confirmer(what))
