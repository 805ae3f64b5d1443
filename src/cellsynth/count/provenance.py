"""Provenance of a count: enough to redo it a year later, and to check that it was redone.

``cellsynth count IMAGE --out points.csv`` writes ``points.provenance.json`` beside
the points: the package version, the input file (name, size, SHA-256, pixel size),
the model (name, kind, SHA-256 of its weights), every setting (the diameter as given,
and as used with its source), the result's count and a SHA-256 of its points, the
date and the command line. ``cellsynth count --from-provenance FILE`` counts again
with what the file records, after checking that the image and the model are the
same files, and gives the same points.
"""

from __future__ import annotations

import hashlib
import os
import shlex
from pathlib import Path
from typing import Any

import numpy as np

from .. import io
from .._provenance import FORMAT, _sha256, file_record as _file, sidecar

__all__ = ["FORMAT", "sidecar", "count_record", "apply", "check_model", "points_sha256"]

#: The count settings a record keeps (the command-line names).
SETTINGS = ("model", "diameter", "channel", "device", "tile", "overlap", "batch_size", "exclude_border", "regions",
            "measure_channels", "thresholds", "marker_names")


def points_sha256(points: np.ndarray) -> str:
    """A hash of the points as written (rounded to 1e-3 px, as the JSON output is)."""
    return hashlib.sha256(np.round(np.asarray(points, float), 3).tobytes()).hexdigest()


def count_record(args, counter, result, *, left_out=None, pixel_size=None) -> dict:
    """The provenance record of one ``cellsynth count`` run (the common record of :mod:`cellsynth._provenance`)."""
    from .._provenance import record

    settings = {k: getattr(args, k, None) for k in SETTINGS}
    if settings["regions"]:
        settings["regions"] = _file(settings["regions"])
    found = {"count": result.count, "per_plane": np.asarray(result.per_plane).ravel().tolist(),
             "diameter_used": result.meta.get("diameter_used"), "diameter_source": result.meta.get("diameter_source"),
             "left_out_border": left_out, "points_sha256": points_sha256(result.points)}
    return record("count", inputs=[_file(args.image)], model=counter.describe(), parameters=settings,
                  pixel_size=pixel_size, result=found,
                  command="cellsynth count " + shlex.join([str(args.image)] + _flags(settings)))


def _flags(settings: dict) -> list:
    out: list = []
    for key, value in settings.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        else:
            out += [flag, str(value["path"] if isinstance(value, dict) else value)]
    return out


def _read(path: os.PathLike | str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such provenance file: {p}")
    doc = io.read_json(p)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("operation") != "count":
        raise ValueError(f"{p} is not the provenance of a count (format {FORMAT!r}, operation 'count')")
    return doc


def apply(args, path: os.PathLike | str) -> dict:
    """Set ``args`` (the ``count`` command's) to what the record at ``path`` says; returns the record.

    Raises
    ------
    FileNotFoundError, ValueError
        No such file, not a count's provenance, or an input that is gone or changed.
    """
    doc = _read(path)
    src = (doc.get("inputs") or [{}])[0] if "inputs" in doc else doc.get("input") or {}  # "input": older records
    image = Path(str(src.get("path", "")))
    if not image.exists():
        raise FileNotFoundError(f"the image this count was made from is not at {image} any more")
    if _sha256(image) != src.get("sha256"):
        raise ValueError(f"{image} has changed since the count (its SHA-256 differs from the record's); the count "
                         "cannot be redone on it")
    settings: dict[str, Any] = dict(doc.get("parameters", doc.get("settings")) or {})
    regions = settings.get("regions")
    if isinstance(regions, dict):
        if not Path(regions.get("path", "")).is_file() or _sha256(Path(regions["path"])) != regions.get("sha256"):
            raise ValueError(f"the regions file {regions.get('path')} is gone or has changed since the count")
        settings["regions"] = regions["path"]
    args.image = str(image)
    for key in SETTINGS:
        if key in settings:
            setattr(args, key, settings[key])
    return doc


def check_model(doc: dict, counter) -> None:
    """Refuse to redo a count with a model whose weights differ from the recorded ones."""
    want = (doc.get("model") or {}).get("sha256")
    have = counter.describe().get("sha256")
    if want and have and want != have:
        raise ValueError(f"the model {counter.name!r} has changed since the count (weights SHA-256 {have[:12]}... "
                         f"instead of {want[:12]}...); the count cannot be redone with it")
