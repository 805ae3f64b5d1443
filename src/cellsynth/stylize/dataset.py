"""Stylizing a layout dataset into a new dataset (InST-Syn) with structure QC.

The output folder is a layout dataset (same manifest format, readable by
:func:`cellsynth.layouts.read_dataset`) whose images are stylized and whose
labels and centres are copies of the input's. Each item also records a QC
count of its stylized image, the drift from the true count and a keep flag.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from collections.abc import Iterable, Iterator
from typing import Any, Optional

import numpy as np

from .. import io
from ..progress import ProgressCallback, report
from .params import StylizeParams

__all__ = ["stylize_dataset", "count_drift", "qc_counter", "qc_count"]


def qc_counter(model="default"):
    """The QC counter, loaded once: `model`; ``"default"`` falls back to the classic
    counter when the shipped model cannot be loaded, any other name or path must load.

    Raises
    ------
    FileNotFoundError, ValueError
        `model` (other than ``"default"``) names no loadable counter.

    Examples
    --------
    >>> qc_counter("classic").name
    'classic'
    """
    from ..count import load_counter

    try:
        return load_counter(model)
    except (FileNotFoundError, ValueError, OSError):
        if model != "default":
            raise
        return load_counter("classic")


def qc_count(image: np.ndarray, *, diameter: float, counter="default") -> tuple[float, str]:
    """Count cells in `image` for QC; returns ``(count, counter used)``.

    Parameters
    ----------
    image : ndarray of shape (M, N) or (M, N, 3)
    diameter : float
        Typical cell diameter in pixels.
    counter : str, path-like or cellsynth.count.Counter
        A counter from :func:`qc_counter`, or a model name for it.

    Examples
    --------
    >>> from skimage.draw import disk
    >>> img = np.zeros((64, 64), np.uint8)
    >>> img[disk((20, 20), 6)] = img[disk((44, 40), 6)] = 180
    >>> qc_count(img, diameter=12, counter="classic")
    (2.0, 'count:classic')
    """
    from ..count import Counter, count_cells

    if not isinstance(counter, Counter):
        counter = qc_counter(counter)
    return float(count_cells(image, counter=counter, diameter=diameter).count), f"count:{counter.name}"


def count_drift(counted: float, true: int) -> float:
    """Relative count drift ``(counted - true) / max(true, 1)``.

    Examples
    --------
    >>> count_drift(90, 100)
    -0.1
    """
    return (float(counted) - int(true)) / max(int(true), 1)


def stylize_dataset(
    in_dir: os.PathLike | str,
    out_dir: os.PathLike | str,
    *,
    pipe,
    token,
    style: np.ndarray,
    params: Optional[StylizeParams] = None,
    tolerance: float = 0.2,
    qc_model: str = "default",
    limit: Optional[int] = None,
    overwrite: bool = False,
    progress: Optional[ProgressCallback] = None,
    scheduler: Any = None,
    workers: Optional[int] = None,
) -> Path:
    """Stylize every image of a layout dataset into `out_dir`, resumably, with count QC.

    Parameters
    ----------
    in_dir : path-like
        A layout dataset (``manifest.json``) as written by ``export_dataset``.
    out_dir : path-like
        Destination; a run stopped part-way resumes here with the same settings.
    pipe : InSTPipeline or dict
        The pipeline; on a cluster, the keyword arguments of
        :func:`~cellsynth.stylize.load_pipeline` (``model``, ``image_encoder``,
        ``device``, ``dtype``, ``offline``...), which each worker loads once.
    token : StyleToken
    style : ndarray
        The style image.
    params : StylizeParams, optional
        Item ``i`` uses seed ``item_seed(params.seed, i)``.
    tolerance : float
        Items whose ``|drift| <= tolerance`` are flagged ``keep``.
    qc_model : str
        Counter for QC (see :func:`qc_counter`).
    limit : int, optional
        Stylize only the first `limit` items.
    overwrite : bool
        Replace a dataset made with other settings in `out_dir`.
    progress : ProgressCallback, optional
        Stage ``"images"``, once per image; may raise ``Cancelled``.
    scheduler, workers : optional
        Stylize on dask.distributed: ``scheduler`` ``"local"`` (or ``workers``
        alone) starts a local cluster of ``workers`` processes, an address
        (``tcp://host:8786``) uses a running scheduler (see
        :func:`cellsynth.batch.cluster_client`). The files and the manifest are
        written here, in order, as a serial run writes them. Default: this process.

    Returns
    -------
    Path
        The output manifest; its ``qc`` summary counts kept and rejected items.

    Raises
    ------
    FileExistsError
        `out_dir` holds other files or another dataset, and `overwrite` is False.
    ValueError
        Bad tolerance or limit, or `out_dir` equal to `in_dir`.
    """
    if scheduler is not None or workers is not None:
        with StylizeOnCluster(pipe, token=token, style=style, qc_model=qc_model, scheduler=scheduler or "local",
                              workers=workers) as remote:
            return _stylize_dataset(in_dir, out_dir, pipe=None, token=token, style=style, params=params,
                                    tolerance=tolerance, qc_model=qc_model, limit=limit, overwrite=overwrite,
                                    progress=progress, remote=remote)
    return _stylize_dataset(in_dir, out_dir, pipe=pipe, token=token, style=style, params=params, tolerance=tolerance,
                            qc_model=qc_model, limit=limit, overwrite=overwrite, progress=progress, remote=None)


def _stylize_dataset(in_dir, out_dir, *, pipe, token, style, params, tolerance, qc_model, limit, overwrite, progress,
                     remote) -> Path:
    from ..layouts.dataset import FORMAT, VERSION, item_seed, read_dataset
    from ..weights import file_sha256
    from .tokens import image_sha256

    # 1. Check inputs
    params = params or StylizeParams()
    if not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
    source = read_dataset(in_dir)
    root = Path(out_dir)
    if root.resolve() == source.root.resolve():
        raise ValueError("out_dir must differ from in_dir")
    n = len(source) if limit is None else int(limit)
    if not 1 <= n <= len(source):
        raise ValueError(f"limit must be in [1, {len(source)}], got {limit!r}")
    settings = {
        "params": params.to_dict(), "token": token.describe(), "style_sha256": image_sha256(np.asarray(style)),
        "source": {"path": str(source.root.resolve()), "manifest_sha256": file_sha256(source.root / "manifest.json")},
        "tolerance": float(tolerance), "qc_model": qc_model,
        "model": remote.model_name if remote is not None else str(getattr(pipe, "name_or_path", None) or ""),
    }

    counter = qc_counter(qc_model)

    # 2. Prepare the output folder (resume when the settings match)
    manifest_path = root / "manifest.json"
    items = _items_to_keep(root, settings, n, overwrite)
    if manifest_path.exists():  # ours (checked above): stale and surplus files are ours too
        _remove_product_files(root, keep=len(items))
    diameter = float(source.manifest.get("params", {}).get("cell_size", 15.0))
    doc = {"format": FORMAT, "version": VERSION, "params": source.manifest.get("params", {}),
           "seed": source.manifest.get("seed"), "n": n, "complete": len(items) == n, "stylize": settings,
           "items": items}
    _summarise(doc)
    io.write_json(manifest_path, doc, overwrite=True)
    report(progress, "images", len(items), n)

    # 3. Loop with progress: stylize, QC count, write, copy labels and centres (on a cluster: the workers
    #    stylize and count, this process writes)
    todo = range(len(items), n)
    inputs = ((io.read_tiff(source.root / source.items[i]["image"])[0],
               StylizeParams(**{**params.to_dict(), "seed": item_seed(params.seed, i)})) for i in todo)
    if remote is None:
        made = ((out.image, *qc_count(out.image, diameter=diameter, counter=counter))
                for out in (pipe(image, style, token, params=p) for image, p in inputs))
    else:
        made = remote.results(inputs, diameter)
    with contextlib.closing(made):
        for i, (styled, counted, used) in zip(todo, made):
            src = source.items[i]
            seed = item_seed(params.seed, i)
            names = _names(i)
            io.write_tiff(root / names["image"], styled, overwrite=True)
            for key in ("labels", "centres"):
                if src.get(key):
                    (root / names[key]).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source.root / src[key], root / names[key])
                else:
                    names[key] = None
            drift = count_drift(counted, src["n_cells"])
            items.append({**names, "seed": seed, "n_cells": int(src["n_cells"]), "source_image": src["image"],
                          "qc": {"count": counted, "counter": used, "drift": drift, "keep": abs(drift) <= tolerance}})
            doc["complete"] = len(items) == n
            _summarise(doc)
            io.write_json(manifest_path, doc, overwrite=True)
            report(progress, "images", i + 1, n, f"image {i + 1}/{n}: drift {drift:+.0%}")
    from .._provenance import record, write_into

    write_into(root, record("stylize-dataset", inputs=[source.root / "manifest.json"],
                            model={"stylize": settings.get("model"), "qc": counter.describe()},
                            parameters=settings, result={"complete": doc["complete"], "n_items": len(items)}))
    return manifest_path


def _summarise(doc: dict) -> None:
    items = doc["items"]
    if items:
        kept = sum(it["qc"]["keep"] for it in items)
        doc["qc"] = {"kept": kept, "rejected": len(items) - kept,
                     "mean_abs_drift": float(np.mean([abs(it["qc"]["drift"]) for it in items]))}


def _names(i: int) -> dict:
    stem = f"stylized_{i:04d}"
    return {"image": f"images/{stem}.tif", "labels": f"labels/{stem}.tif", "centres": f"centres/{stem}.csv"}


def _items_to_keep(root: Path, settings: dict, n: int, overwrite: bool) -> list:
    """The finished items of an earlier run of the same settings (a leading run of them).

    Raises FileExistsError for a folder holding anything else: a manifest that is
    not a stylized dataset's always, other files or other settings unless
    ``overwrite``; ValueError for items naming files this module does not write.
    """
    manifest_path = root / "manifest.json"
    if not manifest_path.exists():
        if root.exists() and any(root.iterdir()) and not overwrite:
            raise FileExistsError(f"{root} is not empty and holds no stylized dataset; choose an empty or new folder")
        return []
    old = io.read_json(manifest_path)
    if not isinstance(old, dict) or not isinstance(old.get("stylize"), dict) or not isinstance(old.get("items"), list):
        raise FileExistsError(f"{manifest_path} is not a stylized dataset's manifest; choose an empty or new folder")
    for i, it in enumerate(old["items"]):
        bad = ({k: it.get(k) for k, v in _names(i).items() if it.get(k) not in (v, None)} if isinstance(it, dict)
               else {"item": it})
        if bad:
            raise ValueError(f"{manifest_path}: item {i} names {bad}, expected {_names(i)}; this manifest was not "
                             "written by stylize_dataset, so nothing in that folder is replaced or removed")
    if old["stylize"] != settings:
        if not overwrite:
            raise FileExistsError(f"{root} already holds a dataset made with other settings; choose a new folder "
                                  "or pass overwrite=True to replace it")
        return []
    items = []
    for it in old["items"][:n]:
        if not all(it.get(k) is None or (root / it[k]).is_file() for k in ("image", "labels", "centres")):
            break
        items.append(it)
    return items


_ITEM_FILE = re.compile(r"^stylized_(\d{4,})\.(tif|csv)$")


def _remove_product_files(root: Path, *, keep: int) -> None:
    """Remove ``stylized_NNNN`` files with index >= ``keep`` and stale temporary files
    (only directly in ``images/``, ``labels/``, ``centres/``, never through a link)."""
    io.remove_stale_parts(root, names=("manifest.json",))
    for sub in ("images", "labels", "centres"):
        folder = root / sub
        if not folder.is_dir() or folder.is_symlink():
            continue
        io.remove_stale_parts(folder)
        for p in folder.iterdir():
            m = _ITEM_FILE.match(p.name)
            if m and int(m.group(1)) >= keep and p.is_file() and not p.is_symlink():
                p.unlink()


# ----------------------------------------------------------------------------- on a dask cluster

_PIPELINE_ARGS = ("model", "image_encoder", "device", "dtype", "offline", "config", "channels_last", "compile")
_QC: dict = {}


def _qc_counter(model: str):
    """One QC counter per worker process."""
    if model not in _QC:
        _QC.clear()
        _QC[model] = qc_counter(model)
    return _QC[model]


def _pipeline(spec: dict):
    from .loading import load_pipeline

    return load_pipeline(**spec)  # kept by load_pipeline's cache: one load per worker process


def _pipeline_name(spec: dict) -> str:
    """Worker task: the name a loaded pipeline records (as the serial run records it)."""
    return str(getattr(_pipeline(spec), "name_or_path", None) or "")


def _stylize_item(image: np.ndarray, params, *, spec: dict, style: np.ndarray, token, qc_model: str,
                  diameter: float) -> tuple:
    """Worker task: ``(stylized image, QC count, counter used)`` of one content image."""
    out = _pipeline(spec)(image, style, token, params=params)
    counted, used = qc_count(out.image, diameter=diameter, counter=_qc_counter(qc_model))
    return out.image, counted, used


class StylizeOnCluster:
    """Stylization of a dataset's images on a dask cluster, for :func:`cellsynth.stylize.stylize_dataset`.

    A context manager (it holds the cluster). ``pipeline`` is the keyword
    arguments of :func:`~cellsynth.stylize.load_pipeline` (each worker loads the
    pipeline once); the style image and token are sent once to every worker.

    Raises
    ------
    TypeError
        ``pipeline`` is not a dict of ``load_pipeline`` arguments (a loaded
        pipeline stays in the process that loaded it).
    """

    def __init__(self, pipeline: Any, *, token, style: np.ndarray, qc_model: str, scheduler: Any = None,
                 workers: Optional[int] = None) -> None:
        if not isinstance(pipeline, dict) or "model" not in pipeline:
            raise TypeError("stylizing on a cluster needs the pipeline's load_pipeline arguments (a dict with "
                            "'model', ...), which every worker loads once; a loaded pipeline cannot be sent")
        unknown = set(pipeline) - set(_PIPELINE_ARGS)
        if unknown:
            raise TypeError(f"unknown load_pipeline arguments {sorted(unknown)}; expected some of {_PIPELINE_ARGS}")
        self.spec = {**pipeline, "progress": None}
        self.token, self.style, self.qc_model = token, np.asarray(style), qc_model
        from .._cluster import cluster_client

        self._cluster = cluster_client(scheduler, workers=workers)
        self.client = None
        self.model_name = ""

    def __enter__(self) -> "StylizeOnCluster":
        from .._cluster import accepts_n_workers

        self.client = self._cluster.__enter__()
        try:
            # every worker there now loads the pipeline at once (others load it with their first image)
            info = self.client.scheduler_info(**({"n_workers": -1} if accepts_n_workers(self.client) else {}))
            futs = [self.client.submit(_pipeline_name, self.spec, workers=[w], allow_other_workers=False, pure=False)
                    for w in info.get("workers", {})] or [self.client.submit(_pipeline_name, self.spec, pure=False)]
            self.model_name = self.client.gather(futs)[0]
        except BaseException:
            self._cluster.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._cluster.__exit__(*exc)

    def results(self, images: Iterable[tuple], diameter: float) -> Iterator[tuple]:
        """``(stylized image, QC count, counter used)`` of each ``(content image, StylizeParams)``, in order."""
        from .._cluster import run_in_order

        return run_in_order(_stylize_item, images, client=self.client, name="stylize",
                            shared={"spec": self.spec, "style": self.style, "token": self.token,
                                    "qc_model": self.qc_model, "diameter": float(diameter)})
