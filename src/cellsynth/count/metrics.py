"""Counting metrics and evaluation of a counter on annotated images."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..progress import ProgressCallback, report
from .data import CountItem, load_count_data
from .models import Counter, load_counter

__all__ = ["count_metrics", "cut_by_border", "evaluate_counter", "match_points"]


def count_metrics(predicted, true) -> dict:
    """MAE, RMSE and ACP@5% / ACP@10% of predicted against true counts.

    ACP@p is the share of images whose rounded predicted count is within
    ``p * true`` of the true count.

    Examples
    --------
    >>> m = count_metrics([10.2, 19.0, 33.0], [10, 20, 30])
    >>> round(m["mae"], 3), m["acp5"], round(m["acp10"], 3)
    (1.4, 0.6666666666666666, 1.0)
    """
    p = np.asarray(predicted, dtype=float).ravel()
    t = np.asarray(true, dtype=float).ravel()
    if p.shape != t.shape or p.size == 0:
        raise ValueError(f"need the same non-zero number of predicted and true counts, got {p.size} and {t.size}")
    err = p - t
    rel = np.abs(np.round(p) - t)
    return {
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err ** 2).mean())),
        "acp5": float((rel <= 0.05 * t).mean()),
        "acp10": float((rel <= 0.10 * t).mean()),
        "mean_rel_error": float((np.abs(err) / np.maximum(t, 1)).mean()),
        "n": int(p.size),
    }


def cut_by_border(points, shape, *, radius: float) -> np.ndarray:
    """Which cells (centres ``points``, radius ``radius`` px) the image border cuts.

    A cell is cut when its disk reaches past the outer edge of the first or last
    row or column of pixels (centres are pixel coordinates, a pixel spanning
    ``-0.5..0.5`` around its centre). Stack coordinates before ``(row, col)`` are
    ignored.

    Examples
    --------
    >>> cut_by_border([[3, 50], [50, 50], [50, 97]], (100, 100), radius=5).tolist()
    [True, False, True]
    """
    p = np.asarray(points, float)
    p = p.reshape(-1, p.shape[-1] if p.ndim == 2 else 2)[:, -2:]
    rows, cols = float(shape[-2]), float(shape[-1])
    r = float(radius)
    return ((p[:, 0] - r < -0.5) | (p[:, 0] + r > rows - 0.5) | (p[:, 1] - r < -0.5) | (p[:, 1] + r > cols - 0.5))


def match_points(predicted, true, *, radius: float, indices: bool = False) -> dict:
    """Match predicted to true cell centres one to one within ``radius`` pixels.

    The matching maximises the number of pairs and, among those, minimises the
    summed distance (:func:`scipy.optimize.linear_sum_assignment` on the
    distances, pairs farther than ``radius`` forbidden).

    Parameters
    ----------
    predicted, true : array-like of shape (K, 2)
        ``(row, col)`` points.
    radius : float
        Largest distance of a match in pixels (usually half a cell diameter).
    indices : bool
        Also return which points matched: ``pairs`` (K, 2) of (predicted, true)
        indices, ``extra`` (predicted points without a match) and ``missed``
        (true points without a match), integer arrays.

    Returns
    -------
    dict
        ``tp``, ``fp``, ``fn``, ``precision``, ``recall``, ``f1`` (1.0 when both
        sets are empty), and with ``indices`` the arrays above.

    Examples
    --------
    >>> m = match_points([[0, 0], [10, 10], [30, 30]], [[1, 0], [10, 12], [50, 50]], radius=3)
    >>> m["tp"], m["fp"], m["fn"], round(m["f1"], 3)
    (2, 1, 1, 0.667)
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial import cKDTree

    if not radius > 0:
        raise ValueError(f"radius must be positive, got {radius!r}")
    p = np.asarray(predicted, float).reshape(-1, 2)
    t = np.asarray(true, float).reshape(-1, 2)
    matched = np.zeros((0, 2), int)
    if len(p) and len(t):
        pairs = cKDTree(p).sparse_distance_matrix(cKDTree(t), radius, output_type="ndarray")
        if len(pairs):
            big = 1e6
            cost = np.full((len(p), len(t)), big)
            cost[pairs["i"], pairs["j"]] = pairs["v"]
            r, c = linear_sum_assignment(cost)
            keep = cost[r, c] < big
            matched = np.stack([r[keep], c[keep]], axis=1).astype(int)
    tp = len(matched)
    fp, fn = len(p) - tp, len(t) - tp
    precision = tp / len(p) if len(p) else 1.0
    recall = tp / len(t) if len(t) else 1.0
    f1 = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    out = {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall, "f1": f1}
    if indices:
        out.update(pairs=matched, extra=np.setdiff1d(np.arange(len(p)), matched[:, 0]),
                   missed=np.setdiff1d(np.arange(len(t)), matched[:, 1]))
    return out


def _as_items(source, *, factor=1.0, unlabelled=False) -> list[CountItem]:
    if source is None:
        return []
    if isinstance(source, list) and source and all(isinstance(x, CountItem) for x in source):
        return source
    return load_count_data(source, factor=factor, unlabelled=unlabelled)


def evaluate_counter(
    dataset: Any,
    *,
    model: Any = "default",
    device: Any = "auto",
    diameter: Any = None,
    tile: int = 256,
    overlap: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
) -> dict:
    """Count every annotated image of a dataset and compare with the annotations.

    Parameters
    ----------
    dataset : path or sequence
        Anything :func:`~cellsynth.count.data.load_count_data` reads.
    model : str, path or Counter
        Counter to evaluate (see :func:`load_counter`).
    device : str
    diameter : float or "auto", optional
        Cell diameter of the dataset's images in pixels (rescales them to the
        counter's scale); ``"auto"`` estimates it per image.
    tile, overlap : int
        Tiling (see :func:`count_cells`).
    progress : ProgressCallback, optional
        Called once per image (stage ``"evaluate"``); may raise ``Cancelled``.

    Returns
    -------
    dict
        :func:`count_metrics` plus ``predicted`` and ``true`` lists.
    """
    from .infer import count_cells

    counter = load_counter(model, device=device) if not isinstance(model, Counter) else model
    items = _as_items(dataset)
    items = [it for it in items if it.centres is not None]
    if not items:
        raise ValueError("the evaluation set holds no annotated images")
    pred, true = [], []
    for i, it in enumerate(items):
        res = count_cells(it.image, counter=counter, diameter=diameter, tile=tile, overlap=overlap)
        pred.append(res.count)
        true.append(len(it.centres))
        report(progress, "evaluate", i + 1, len(items))
    out = count_metrics(pred, true)
    out.update(predicted=[float(v) for v in pred], true=[int(v) for v in true])
    return out
