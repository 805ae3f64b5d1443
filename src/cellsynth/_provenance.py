"""Provenance sidecars: the record written beside every result, to redo it a year later.

Every CSV, JSON, TIFF or results folder the product writes gets ``NAME.provenance.json``
beside it (inside a results folder, beside its table): the package version, the date,
the operation and its command line, every parameter, each input file (name, size,
SHA-256), the model (name and SHA-256 of its weights, where there is one) and the pixel
size. One format for all of them (``"format": "cellsynth-provenance"``); ``cellsynth
count --from-provenance`` reads the count's.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

__all__ = ["FORMAT", "FOLDER_FILE", "sidecar", "file_record", "record", "write_sidecar", "write_into", "vars_of",
           "paths_of"]

FORMAT = "cellsynth-provenance"
#: The provenance file inside a result folder (a counter, a dataset, a token).
FOLDER_FILE = "provenance.json"
#: Inputs bigger than this together are listed with their size only (hashing them would read them again).
HASH_LIMIT = 2 * 1024 ** 3


def sidecar(out: os.PathLike | str) -> Path:
    """The provenance file of an output: ``points.csv`` -> ``points.provenance.json``,
    ``stained.ome.tif`` -> ``stained.provenance.json``."""
    out = Path(out)
    stem = out.name
    for ext in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    else:
        stem = out.stem
    return out.with_name(f"{stem}.provenance.json")


def file_record(path: os.PathLike | str, *, digest: bool = True) -> dict:
    """Name, size and SHA-256 of a file; for a folder (OME-Zarr), of the list of its files and their sizes."""
    p = Path(path)
    out: dict[str, Any] = {"path": str(p.resolve()), "name": p.name, "bytes": _size(p)}
    if digest:
        out["sha256"] = _sha256(p)
    return out


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def _sha256(p: Path) -> str:
    from .weights import file_sha256

    if not p.is_dir():
        return file_sha256(p)
    h = hashlib.sha256()  # a folder's chunks are many: their names and sizes stand for them
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(f"{f.relative_to(p).as_posix()}\0{f.stat().st_size}\n".encode())
    return h.hexdigest()


def record(operation: str, *, inputs: Iterable = (), model: Optional[dict] = None,
           parameters: Optional[dict] = None, pixel_size: Optional[float] = None, result: Optional[dict] = None,
           command: Optional[str] = None) -> dict:
    """The provenance record of one run: ``inputs`` are paths (or ready records); files of more than
    :data:`HASH_LIMIT` bytes together are listed without their SHA-256."""
    from . import __version__

    inputs = list(inputs)
    paths = [Path(i) for i in inputs if not isinstance(i, dict)]
    total = sum(_size(p) for p in paths if p.exists())
    files = [i if isinstance(i, dict) else file_record(i, digest=total <= HASH_LIMIT) if Path(i).exists()
             else {"name": Path(i).name, "path": str(i), "missing": True} for i in inputs]
    return {
        "format": FORMAT, "version": 1, "operation": operation, "cellsynth_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": files, "model": model, "parameters": _plain(parameters or {}),
        "pixel_size_um": pixel_size, "result": _plain(result or {}),
        "command": command if command is not None else
        " ".join(["cellsynth", *sys.argv[1:]]) if Path(sys.argv[0]).name == "cellsynth" else None,
    }


def _plain(value):
    """JSON-ready: paths as strings, tuples as lists, numpy scalars as numbers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def vars_of(args) -> dict:
    """A command's parameters as given (its argparse namespace, without the function it runs)."""
    return {k: v for k, v in vars(args).items() if not callable(v) and k not in ("func", "command")}


def write_sidecar(out: os.PathLike | str, rec: dict, *, overwrite: bool = False) -> Path:
    """Write ``rec`` as the provenance file of ``out``; returns its path."""
    from . import io

    return io.write_json(sidecar(out), rec, overwrite=overwrite)


def write_into(folder: os.PathLike | str, rec: dict) -> Path:
    """Write ``rec`` as ``FOLDER/provenance.json`` (a result folder of ours: replaced on every run)."""
    from . import io

    return io.write_json(Path(folder) / FOLDER_FILE, rec, overwrite=True)


def paths_of(*values) -> list:
    """The file and folder paths among ``values`` (in-memory inputs, such as arrays or lists of items, left out)."""
    out = []
    for v in values:
        if isinstance(v, (str, os.PathLike)) and Path(v).exists():
            out.append(Path(v))
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, (str, os.PathLike)) for x in v):
            out += [Path(x) for x in v if Path(x).exists()]
    return out
