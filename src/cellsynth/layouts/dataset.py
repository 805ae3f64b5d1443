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

A dataset of layouts drawn or edited by hand (:func:`append_layout`) has the same
files; its manifest says ``"drawn": true``, has no ``params``/``seed`` of its own
(``null``), and each item carries the ``params`` it was rendered with.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable, Iterator
from typing import Any, Optional

import numpy as np

from .. import io
from ..progress import ProgressCallback, report
from .generate import Layout, generate_layout
from .params import LayoutParams

__all__ = ["export_dataset", "append_layout", "read_dataset", "LayoutDataset", "FORMAT", "item_seed"]

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
    scheduler: Any = None,
    workers: Optional[int] = None,
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
    scheduler, workers : optional
        Generate the layouts on dask.distributed: ``scheduler`` ``"local"`` (or
        ``workers`` alone) starts a local cluster of ``workers`` processes, an
        address (``tcp://host:8786``) uses a running scheduler (see
        :func:`cellsynth.batch.cluster_client`). The files are written here, in
        order, and are the serial export's. Default: generated in this process.

    Returns
    -------
    Path
        The manifest path.

    Raises
    ------
    FileExistsError
        ``out_dir`` holds other files, or a dataset made with other settings,
        and ``overwrite`` is False; or its ``manifest.json`` is not a layout
        dataset's (whatever ``overwrite`` says).
    ValueError
        The manifest's items name files other than the ones this function makes
        (such as ``../x`` or absolute paths); nothing is removed then.

    Notes
    -----
    Files are only ever written or removed inside ``out_dir``, under the names
    above: ``overwrite`` and a smaller ``n`` remove the item files beyond the kept
    ones, and a re-run removes temporary files that a killed run left.
    """
    params = params or LayoutParams()
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    n, seed = int(n), int(seed)
    root = Path(out_dir)
    manifest_path = root / "manifest.json"
    items = _items_to_keep(root, params, seed, n, overwrite)
    if manifest_path.exists():  # ours (checked above): stale and surplus files are ours too
        _remove_product_files(root, keep=len(items))
    doc = {"format": FORMAT, "version": VERSION, "params": params.to_dict(), "seed": seed, "n": n,
           "complete": len(items) == n, "items": items}
    io.write_json(manifest_path, doc, overwrite=True)
    report(progress, "layouts", len(items), n)
    todo = range(len(items), n)
    if scheduler is None and workers is None:
        made = (_write_item(root, i, params, item_seed(seed, i)) for i in todo)
    else:
        made = layouts_on_cluster(root, todo, params, seed, scheduler=scheduler, workers=workers)
    with contextlib.closing(made):
        for i, item in zip(todo, made):
            items.append(item)
            doc["complete"] = len(items) == n
            io.write_json(manifest_path, doc, overwrite=True)
            report(progress, "layouts", i + 1, n)
    from .._provenance import record, write_into

    write_into(root, record("layouts", parameters={"params": params.to_dict(), "seed": seed, "n": n},
                            result={"complete": doc["complete"], "n_items": len(items)}))
    return manifest_path


def append_layout(
    out_dir: os.PathLike | str,
    layout: Layout,
    *,
    params: Optional[LayoutParams] = None,
    seed: Optional[int] = None,
    overwrite: bool = False,
) -> Path:
    """Add one layout (drawn or edited by hand) as the next item of a dataset of drawn layouts.

    The files are those of :func:`export_dataset` (image, labels, centres CSV with the
    per-cell table), written atomically, then the manifest; earlier items are never
    rewritten, so a folder grows one layout per call.

    Parameters
    ----------
    out_dir : path-like
        Destination folder: new, empty, or a dataset of drawn layouts.
    layout : Layout
        What to write (e.g. :func:`render_layout`'s result).
    params : LayoutParams, optional
        The parameters it was rendered with, recorded in its item.
    seed : int, optional
        The seed of its look, recorded in its item.
    overwrite : bool
        Replace a generated dataset (or add to a folder holding other files).

    Returns
    -------
    Path
        The manifest path.

    Raises
    ------
    FileExistsError
        ``out_dir`` holds other files or a generated dataset and ``overwrite`` is
        False, or a manifest that is not a layout dataset's.
    ValueError
        The manifest's items name files other than the ones this module makes.
    """
    root = Path(out_dir)
    manifest_path = root / "manifest.json"
    old = _our_manifest(root, overwrite)
    items: list = []
    if old is not None:
        if not old.get("drawn"):
            if not overwrite:
                raise FileExistsError(f"{root} holds a generated layout dataset ({len(old.get('items', []))} layouts "
                                      "made from a seed); choose another folder or allow replacing it")
        else:
            for it in old.get("items", []):
                if not all((root / it[k]).is_file() for k in ("image", "labels", "centres")):
                    break
                items.append(it)
        _remove_product_files(root, keep=len(items))
    doc = {"format": FORMAT, "version": VERSION, "drawn": True, "params": None, "seed": None, "n": len(items),
           "complete": True, "items": items}
    if old is not None and not old.get("drawn"):  # a replaced dataset's manifest goes before its files change
        io.write_json(manifest_path, doc, overwrite=True)
    item = _write_layout(root, len(items), layout)
    item.update(drawn=True, seed=None if seed is None else int(seed),
                params=(params or LayoutParams()).to_dict())
    items.append(item)
    doc["n"] = len(items)
    io.write_json(manifest_path, doc, overwrite=True)
    return manifest_path


def _write_layout(root: Path, i: int, lay: Layout) -> dict:
    names = _names(i)
    io.write_tiff(root / names["image"], lay.image, overwrite=True)
    io.write_tiff(root / names["labels"], lay.labels, overwrite=True)
    feats = {k: v for k, v in lay.cells.items() if k not in ("row", "col")}
    io.write_points_csv(root / names["centres"], lay.centres, features=feats, overwrite=True)
    return {**names, "n_cells": lay.n_cells}


def _write_item(root: Path, i: int, params: LayoutParams, s: int) -> dict:
    item = _write_layout(root, i, generate_layout(params, rng=s))
    return {**_names(i), "seed": s, "n_cells": item["n_cells"]}


def _our_manifest(root: Path, overwrite: bool) -> Optional[dict]:
    """The manifest of the layout dataset in ``root`` (None when there is none), checked.

    Raises FileExistsError for a folder holding something else (a foreign manifest
    always; other files unless ``overwrite``), ValueError for a manifest of ours
    whose items name files this module did not make.
    """
    manifest_path = root / "manifest.json"
    if not manifest_path.exists():
        if root.exists() and any(root.iterdir()) and not overwrite:
            raise FileExistsError(f"{root} is not empty and holds no layout dataset; choose an empty or new folder")
        return None
    old = io.read_json(manifest_path)
    if not isinstance(old, dict) or old.get("format") != FORMAT or not isinstance(old.get("items", []), list):
        found = old.get("format") if isinstance(old, dict) else None
        raise FileExistsError(f"{manifest_path} is not a layout dataset manifest (format {found!r}, expected "
                              f"{FORMAT!r}); choose an empty or new folder")
    for i, it in enumerate(old.get("items", [])):
        bad = {k: it.get(k) if isinstance(it, dict) else it for k, v in _names(i).items()
               if not isinstance(it, dict) or it.get(k) != v}
        if bad:
            raise ValueError(f"{manifest_path}: item {i} names {bad}, expected {_names(i)}; this manifest was not "
                             "written by export_dataset, so nothing in that folder is replaced or removed")
    return old


def _items_to_keep(root: Path, params: LayoutParams, seed: int, n: int, overwrite: bool) -> list:
    """The finished items of an earlier export of the same settings that a resume keeps.

    Raises FileExistsError for a folder holding something else (a foreign manifest
    always; other files or another dataset unless ``overwrite``), ValueError for a
    manifest of ours whose items name files the export did not make.
    """
    old = _our_manifest(root, overwrite)
    if old is None:
        return []
    if old.get("params") != params.to_dict() or old.get("seed") != seed:
        if not overwrite:
            raise FileExistsError(f"{root} already holds a layout dataset made with other parameters or seed; "
                                  "choose a new folder or pass overwrite=True to replace it")
        return []
    items = []
    for it in old.get("items", [])[:n]:
        if not all((root / it[k]).is_file() for k in ("image", "labels", "centres")):
            break
        items.append(it)
    return items


_ITEM_FILE = re.compile(r"^layout_(\d{4,})\.(tif|csv)$")
_SUBDIRS = {"images": ".tif", "labels": ".tif", "centres": ".csv"}


def _remove_product_files(root: Path, *, keep: int) -> None:
    """Remove the item files this module names with index >= ``keep`` and stale temporary files.

    Only ``images/``, ``labels/`` and ``centres/`` directly under ``root`` are
    looked at (never through a symbolic link), and only names ``layout_NNNN``.
    """
    io.remove_stale_parts(root, names=("manifest.json",))
    for sub, ext in _SUBDIRS.items():
        folder = root / sub
        if not folder.is_dir() or folder.is_symlink():
            continue
        io.remove_stale_parts(folder)
        for p in folder.iterdir():
            m = _ITEM_FILE.match(p.name)
            if m and p.suffix == ext and int(m.group(1)) >= keep and p.is_file() and not p.is_symlink():
                p.unlink()


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
    if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
        raise ValueError(f"{manifest_path} has no 'items' list; expected a manifest written by export_dataset")
    for k, it in enumerate(doc["items"]):
        if not isinstance(it, dict):
            raise ValueError(f"{manifest_path}: item {k} is not an object with image/centres/n_cells")
        missing = [key for key in ("image", "centres", "n_cells") if key not in it]
        if missing:
            raise ValueError(f"{manifest_path}: item {k} lacks {missing}")
        for key in ("image", "centres", "labels"):
            if key in it and not (key == "labels" and not it[key]):
                io.path_inside(manifest_path.parent, it[key], what=f"item {k}'s {key}")
    return LayoutDataset(root=manifest_path.parent, manifest=doc)


# ----------------------------------------------------------------------------- on a dask cluster

def _layout(params, seed: int):
    """Worker task: one layout."""
    from .generate import generate_layout

    return generate_layout(params, rng=seed)


def layouts_on_cluster(root, indices: Iterable[int], params, seed: int, *, scheduler: Any = None,
                       workers: Optional[int] = None) -> Iterator[dict]:
    """Manifest items of layouts ``indices`` of a dataset, generated on the cluster and written here, in order.

    Used by :func:`export_dataset` (``scheduler``/``workers``):
    item ``i`` is ``generate_layout(params, rng=item_seed(seed, i))`` written by
    the same functions as the serial export.
    """
    from .._cluster import run_in_order

    indices = list(indices)
    seeds = [item_seed(seed, i) for i in indices]
    made = run_in_order(_layout, [(params, s) for s in seeds], scheduler=scheduler, workers=workers, name="layout")
    with contextlib.closing(made):
        for i, s, lay in zip(indices, seeds, made):
            item = _write_layout(root, i, lay)
            yield {**_names(i), "seed": s, "n_cells": item["n_cells"]}
