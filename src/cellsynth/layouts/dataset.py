"""Layout datasets on disk: N layouts as TIFFs + centre CSVs + ``manifest.json``.

Folder layout::

    DIR/manifest.json          {"format", "version", "params", "seed", "n", "complete", "items": [...]}
    DIR/images/layout_0000.tif uint8 image
    DIR/labels/layout_0000.tif uint16 instance labels
    DIR/centres/layout_0000.csv row,col + the per-cell table as feature columns

Each item of ``items`` gives ``image``, ``labels``, ``centres`` (paths relative
to DIR), ``seed`` (``generate_layout(params, rng=seed)`` reproduces it) and
``n_cells`` (the true count). Every file is written atomically and the manifest
is rewritten after each item, so an export stopped by a cancel or a crash
resumes where it stopped and never leaves partial files behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .. import io
from ..progress import ProgressCallback, report
from .generate import generate_layout
from .params import LayoutParams

__all__ = ["export_dataset", "read_dataset", "LayoutDataset", "FORMAT", "item_seed"]

FORMAT = "cellsynth-layouts"
VERSION = 1


def item_seed(seed: int, index: int) -> int:
    """The seed of item ``index`` of a dataset exported with ``seed``.

    Examples
    --------
    >>> item_seed(0, 1) == item_seed(0, 1) != item_seed(0, 2)
    True
    """
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint32)[0])


def _names(i: int) -> dict:
    stem = f"layout_{i:04d}"
    return {"image": f"images/{stem}.tif", "labels": f"labels/{stem}.tif", "centres": f"centres/{stem}.csv"}


def export_dataset(
    out_dir: os.PathLike | str,
    n: int,
    *,
    params: Optional[LayoutParams] = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: Optional[ProgressCallback] = None,
) -> Path:
    """Write ``n`` layouts to ``out_dir``; resume an interrupted export of the same settings.

    Parameters
    ----------
    out_dir : path-like
        Destination folder (created when missing).
    n : int
        Number of layouts in the finished dataset.
    params : LayoutParams, optional
        Generator parameters.
    seed : int
        Base seed; item ``i`` uses ``item_seed(seed, i)``.
    overwrite : bool
        Replace a dataset made with other settings (its files only).
    progress : ProgressCallback, optional
        Called once per layout (stage ``"layouts"``); may raise ``Cancelled``.

    Returns
    -------
    Path
        The manifest path.

    Raises
    ------
    FileExistsError
        ``out_dir`` holds other files, or a dataset made with other settings,
        and ``overwrite`` is False.
    """
    params = params or LayoutParams()
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    n, seed = int(n), int(seed)
    root = Path(out_dir)
    manifest_path = root / "manifest.json"
    items: list[dict] = []
    if manifest_path.exists():
        old = io.read_json(manifest_path)
        same = old.get("format") == FORMAT and old.get("params") == params.to_dict() and old.get("seed") == seed
        if same:
            items = [it for it in old.get("items", [])[:n] if all((root / it[k]).is_file() for k in ("image", "labels", "centres"))]
        elif not overwrite:
            raise FileExistsError(
                f"{root} already holds a layout dataset made with other parameters or seed; "
                "choose a new folder or pass overwrite=True (--overwrite) to replace it"
            )
        else:
            for it in old.get("items", []):
                for k in ("image", "labels", "centres"):
                    (root / it[k]).unlink(missing_ok=True)
    elif root.exists() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{root} is not empty and holds no layout dataset; choose an empty or new folder"
        )
    doc = {"format": FORMAT, "version": VERSION, "params": params.to_dict(), "seed": seed, "n": n,
           "complete": False, "items": items}
    io.write_json(manifest_path, doc, overwrite=True)
    report(progress, "layouts", len(items), n)
    for i in range(len(items), n):
        s = item_seed(seed, i)
        lay = generate_layout(params, rng=s)
        names = _names(i)
        io.write_tiff(root / names["image"], lay.image, overwrite=True)
        io.write_tiff(root / names["labels"], lay.labels, overwrite=True)
        feats = {k: v for k, v in lay.cells.items() if k not in ("row", "col")}
        io.write_points_csv(root / names["centres"], lay.centres, features=feats, overwrite=True)
        items.append({**names, "seed": s, "n_cells": lay.n_cells})
        doc["complete"] = len(items) == n
        io.write_json(manifest_path, doc, overwrite=True)
        report(progress, "layouts", i + 1, n)
    return manifest_path


@dataclass(frozen=True)
class LayoutDataset:
    """A dataset folder read back: the manifest and its items.

    ``load(i)`` returns ``(image, centres, labels)``; ``labels`` is None for
    datasets whose items carry no label image (e.g. stylized images).
    """

    root: Path
    manifest: dict

    @property
    def items(self) -> list:
        return self.manifest["items"]

    def __len__(self) -> int:
        return len(self.items)

    def counts(self) -> np.ndarray:
        """True cell counts of all items."""
        return np.array([it["n_cells"] for it in self.items], dtype=int)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        it = self.items[i]
        image, _ = io.read_tiff(self.root / it["image"])
        centres, _ = io.read_points_csv(self.root / it["centres"])
        labels = io.read_tiff(self.root / it["labels"])[0] if it.get("labels") else None
        return image, centres, labels


def read_dataset(path: os.PathLike | str) -> LayoutDataset:
    """Open a dataset folder (or its ``manifest.json``).

    Raises
    ------
    FileNotFoundError
        No manifest there.
    ValueError
        The manifest lacks ``items`` or an item lacks ``image``/``centres``/``n_cells``.
    """
    p = Path(path)
    manifest_path = p if p.is_file() else p / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no manifest.json in {p}; expected a dataset folder written by export_dataset")
    doc = io.read_json(manifest_path)
    if not isinstance(doc.get("items"), list):
        raise ValueError(f"{manifest_path} has no 'items' list")
    for k, it in enumerate(doc["items"]):
        missing = [key for key in ("image", "centres", "n_cells") if key not in it]
        if missing:
            raise ValueError(f"{manifest_path}: item {k} lacks {missing}")
    return LayoutDataset(root=manifest_path.parent, manifest=doc)
