"""A parameter form built from a validated frozen dataclass, persisted between sessions."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

from magicgui.widgets import CheckBox, Container, FloatSpinBox, PushButton, SpinBox, TupleEdit

from ..settings import config_dir

__all__ = ["ParamsForm", "config_dir"]  # config_dir: re-exported from cellsynth.settings


def _widget(name: str, value: Any, meta: dict):
    label = name.replace("_", " ")
    tip = meta.get("help", "")
    low, high = meta.get("low"), meta.get("high")
    if isinstance(value, bool):
        return CheckBox(value=value, name=name, label=label, tooltip=tip)
    if isinstance(value, tuple):
        sub: dict[str, Any] = {"min": low if low is not None else -1e9, "max": high if high is not None else 1e9}
        if isinstance(value[0], float):
            sub["step"] = 0.05 if (high or 10) <= 10 else 1.0
        return TupleEdit(value=value, options=sub, name=name, label=label, tooltip=tip)
    if isinstance(value, int):
        return SpinBox(value=value, min=int(low if low is not None else -1e9), max=int(high if high is not None else 1e9),
                       name=name, label=label, tooltip=tip)
    step = 0.01 if (high is not None and high <= 1) else 0.5
    return FloatSpinBox(value=value, min=low if low is not None else -1e9, max=high if high is not None else 1e9,
                        step=step, name=name, label=label, tooltip=tip)


class ParamsForm(Container):
    """magicgui form with one widget per field of a parameter dataclass.

    ``params()`` builds (and so validates) the dataclass; ``save()``/``load``
    keep the values in ``config_dir()/<key>.json`` between sessions.
    """

    def __init__(self, cls: type, *, key: str, exclude: tuple = (), **kwargs: Any) -> None:
        self._cls, self._key = cls, key
        defaults = cls()
        self._fields = [f for f in dataclasses.fields(cls) if f.name not in exclude]
        widgets = [_widget(f.name, getattr(defaults, f.name), dict(f.metadata)) for f in self._fields]
        self.reset_button = PushButton(text="Reset to defaults",
                                       tooltip="the values remembered from earlier sessions go back to the defaults")
        super().__init__(widgets=widgets + [self.reset_button], **kwargs)
        self.reset_button.changed.connect(lambda *_: (self.reset(), self.save()))
        self._load()

    @property
    def path(self) -> Path:
        return config_dir() / f"{self._key}.json"

    def values(self) -> dict:
        return {f.name: getattr(self, f.name).value for f in self._fields}

    def params(self, **overrides: Any):
        """The dataclass built from the form (raises its ValueError on bad values)."""
        return self._cls(**{**self.values(), **overrides})

    def set_values(self, values: dict) -> None:
        for f in self._fields:
            if f.name in values:
                v = values[f.name]
                getattr(self, f.name).value = tuple(v) if isinstance(v, list) else v

    def reset(self) -> None:
        defaults = self._cls()
        self.set_values({f.name: getattr(defaults, f.name) for f in self._fields})

    def save(self) -> None:
        from ..io import write_json

        try:
            write_json(self.path, self.params().to_dict() if hasattr(self._cls, "to_dict") else self.values(), overwrite=True)
        except (OSError, ValueError):
            pass  # settings are a convenience; never fail a run over them

    def _load(self) -> None:
        try:
            saved: Optional[dict] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if isinstance(saved, dict):
            try:
                self.set_values(saved)
            except (TypeError, ValueError):
                self.reset()
