"""Virtual staining metrics (DiffStain Table 1): MSE, MAE, PCC and SSIM per channel and averaged.

Both images are compared on the model's normalised intensity scale [0, 1]
(the training set's 2-98 percentiles), so the numbers are comparable to the
paper's.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from ..progress import ProgressCallback, report

__all__ = ["stain_metrics", "evaluate_stain", "METRICS"]

METRICS = ("mse", "mae", "pcc", "ssim")


def stain_metrics(pred: np.ndarray, target: np.ndarray, names: Optional[Sequence[str]] = None) -> dict:
    """Metrics of a predicted (C, M, N) stack against its target, both in [0, 1].

    Returns
    -------
    dict
        ``{"average": {mse, mae, pcc, ssim}, "channels": {name: {...}}}``.

    Examples
    --------
    >>> t = np.random.default_rng(0).random((2, 32, 32))
    >>> m = stain_metrics(t, t, ["a", "b"])
    >>> m["average"]["pcc"], m["average"]["mse"], m["channels"]["b"]["ssim"]
    (1.0, 0.0, 1.0)
    """
    from skimage.metrics import mean_squared_error, structural_similarity

    p = np.asarray(pred, np.float64)
    t = np.asarray(target, np.float64)
    if p.shape != t.shape or p.ndim != 3:
        raise ValueError(f"pred and target must be (C, M, N) stacks of one shape, got {p.shape} and {t.shape}")
    names = list(names) if names is not None else [str(i) for i in range(len(p))]
    if len(names) != len(p):
        raise ValueError(f"{len(names)} names for {len(p)} channels")
    channels = {}
    for name, a, b in zip(names, p, t):
        if a.std() > 0 and b.std() > 0:
            pcc = float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
        else:
            pcc = 0.0
        win = min(7, min(a.shape) - (1 - min(a.shape) % 2))
        channels[name] = {
            "mse": float(mean_squared_error(b, a)),
            "mae": float(np.mean(np.abs(a - b))),
            "pcc": round(pcc, 12),
            "ssim": float(structural_similarity(b, a, data_range=1.0, win_size=max(win, 3))),
        }
    average = {k: float(np.mean([c[k] for c in channels.values()])) for k in METRICS}
    return {"average": average, "channels": channels}


def _mean_of(results: list, names: Sequence[str]) -> dict:
    channels = {n: {k: float(np.mean([r["channels"][n][k] for r in results])) for k in METRICS} for n in names}
    average = {k: float(np.mean([c[k] for c in channels.values()])) for k in METRICS}
    return {"average": average, "channels": channels}


def evaluate_stain(
    data_dir: os.PathLike | str,
    pipeline,
    *,
    params=None,
    limit: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
    nsc_params=None,
    backbone=None,
) -> dict:
    """Stain every field of view of a paired-data folder and average the metrics.

    Parameters
    ----------
    data_dir : path-like
        Paired data (:mod:`cellsynth.stain.data`) with the model's plane and channel names.
    pipeline : StainPipeline
    params : StainParams, optional
    limit : int, optional
        Use only the first ``limit`` fields of view.
    progress : ProgressCallback, optional
        One event per field of view (stage ``"evaluate"``).
    nsc_params : NSCParams, optional
        NSC settings of mask guidance (see the pipeline).
    backbone : optional
        A ready NSC backbone (built once for every field of view).

    Returns
    -------
    dict
        ``{"average": {...}, "channels": {...}, "n": int}``.
    """
    from .data import read_stain_dataset
    from .model import to_unit

    if limit is not None and (not isinstance(limit, (int, np.integer)) or limit < 1):
        raise ValueError(f"limit must be a positive number of fields of view (--limit >= 1), got {limit!r}")
    ds = read_stain_dataset(data_dir)
    cfg = pipeline.config
    if list(ds.channels) != list(cfg.channel_names) or len(ds.brightfield) != cfg.n_condition:
        raise ValueError(f"{data_dir} has planes {ds.brightfield} and channels {ds.channels}; the model expects "
                         f"{cfg.n_condition} planes and channels {cfg.channel_names}")
    n = len(ds) if limit is None else min(limit, len(ds))
    results = []
    for i in range(n):
        bf, fl = ds.load(i)
        out = pipeline(bf, params=params, nsc_params=nsc_params, backbone=backbone)
        results.append(stain_metrics(out.images, to_unit(fl, cfg.target_norm), cfg.channel_names))
        report(progress, "evaluate", i + 1, n)
    summary = _mean_of(results, cfg.channel_names)
    summary["n"] = n
    return summary
