"""Marker-positive classes: per-nucleus intensity in other channels, a threshold per channel, a class per nucleus.

Each counted nucleus is measured in each chosen channel as the mean intensity of
the pixels within half the diameter of its centre (pixels nearer to another
centre belong to that one, so touching nuclei do not share pixels). A channel's
threshold is typed, or chosen automatically by Otsu's method on the per-nucleus
means (:func:`skimage.filters.threshold_otsu`): the nuclei split into the two
groups of means with the largest between-group variance, and the threshold lies
in the middle of the gap between the groups. A nucleus whose
mean is above a channel's threshold is positive for it; its class names the
channels it is positive for (``"Ki67+ EdU+"``), or ``"negative"``.

Examples
--------
>>> img = np.zeros((2, 40, 40)); img[1, 5:15, 5:15] = 100
>>> m = nucleus_means(img[1:], np.array([[10.0, 10.0], [30.0, 30.0]]), diameter=8)
>>> m[:, 0].round(1).tolist()
[100.0, 0.0]
>>> classify(m, [50.0], ["Ki67"]).tolist()
['Ki67+', 'negative']
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

__all__ = ["nucleus_means", "auto_thresholds", "classify", "class_counts", "marker_options", "class_columns",
           "THRESHOLD_METHOD"]

#: How thresholds are chosen when not typed.
THRESHOLD_METHOD = "otsu"


def nucleus_means(channels: np.ndarray, points: np.ndarray, *, diameter: float) -> np.ndarray:
    """Mean intensity of each channel around each point: ``(K, C)`` for ``channels`` of shape (C, M, N).

    The pixels of a nucleus are those within ``diameter / 2`` of its centre and
    nearer to it than to any other centre. A nucleus with no pixel (a centre
    off the image) gets NaN.
    """
    from scipy import ndimage as ndi
    from scipy.spatial import cKDTree

    ch = np.asarray(channels, float)
    if ch.ndim == 2:
        ch = ch[None]
    if ch.ndim != 3:
        raise ValueError(f"channels must have shape (C, M, N), got {ch.shape}")
    if not diameter > 0:
        raise ValueError(f"diameter must be positive, got {diameter!r}")
    p = np.asarray(points, float).reshape(-1, np.shape(points)[-1] if np.ndim(points) == 2 else 2)[:, -2:]
    out = np.full((len(p), len(ch)), np.nan)
    if len(p) == 0:
        return out
    rows, cols = ch.shape[1:]
    r = 0.5 * float(diameter)
    # only the pixels near some centre are looked at: the bounding boxes of the disks
    near = np.zeros((rows, cols), bool)
    for y, x in p:
        near[max(0, int(y - r)):max(0, int(y + r) + 1), max(0, int(x - r)):max(0, int(x + r) + 1)] = True
    yy, xx = np.nonzero(near)
    dist, idx = cKDTree(p).query(np.stack([yy, xx], axis=1), k=1, distance_upper_bound=r)
    hit = np.isfinite(dist)
    labels = np.zeros((rows, cols), np.int64)
    labels[yy[hit], xx[hit]] = idx[hit] + 1
    index = np.arange(1, len(p) + 1)
    sizes = ndi.sum(np.ones((rows, cols)), labels, index)
    for c in range(len(ch)):
        means = np.asarray(ndi.mean(ch[c], labels, index), float)
        out[:, c] = np.where(np.asarray(sizes) > 0, means, np.nan)
    return out


def auto_thresholds(means: np.ndarray) -> list[float]:
    """One threshold per channel by Otsu's method on the per-nucleus means (NaN left out).

    Otsu's criterion is evaluated on the sorted values themselves, every cut
    between two neighbours tried, and the threshold is the middle of the chosen
    gap. (:func:`skimage.filters.threshold_otsu` works on a 256-bin histogram
    and returns a bin's centre: with a few dozen nuclei all negatives share one
    bin and the threshold falls inside them.)

    Examples
    --------
    >>> auto_thresholds(np.array([[38.3], [39.8], [40.1], [40.4], [611.0], [889.0]]))
    [325.7]
    """
    m = np.asarray(means, float)
    out = []
    for c in range(m.shape[1]):
        v = np.sort(m[:, c][np.isfinite(m[:, c])])
        if len(v) < 2 or v[-1] == v[0]:
            raise ValueError(f"channel {c + 1} of the measured ones: too few nuclei or one value only to choose a "
                             "threshold automatically; type one")
        n = np.arange(1, len(v))  # sizes of the lower group for each cut
        csum = np.cumsum(v)[:-1]
        mu0, mu1 = csum / n, (v.sum() - csum) / (len(v) - n)
        between = n * (len(v) - n) * (mu1 - mu0) ** 2
        between[v[1:] == v[:-1]] = -1  # no cut between equal values
        k = int(np.argmax(between))
        out.append(round(float((v[k] + v[k + 1]) / 2), 6))
    return out


def classify(means: np.ndarray, thresholds: Sequence[float], names: Sequence[str]) -> np.ndarray:
    """The class of each nucleus: the channels it is positive for (``"A+ B+"``) or ``"negative"``."""
    m = np.asarray(means, float)
    if m.shape[1] != len(thresholds) or len(names) != len(thresholds):
        raise ValueError(f"one threshold and one name per measured channel: {m.shape[1]} channels, "
                         f"{len(thresholds)} thresholds, {len(names)} names")
    positive = m > np.asarray(thresholds, float)[None, :]
    out = []
    for row in positive:
        pos = [f"{n}+" for n, on in zip(names, row) if on]
        out.append(" ".join(pos) if pos else "negative")
    return np.array(out, dtype=object)


def class_counts(classes: Sequence[str], names: Optional[Sequence[str]] = None) -> list[dict]:
    """``[{"class", "count", "percent"}]``, every combination of ``names`` listed (zeros too), negative first."""
    import itertools

    classes = list(classes)
    total = len(classes)
    order = ["negative"]
    if names:
        for k in range(1, len(names) + 1):
            for combo in itertools.combinations(names, k):
                order.append(" ".join(f"{n}+" for n in combo))
    order += sorted(set(classes) - set(order))
    return [{"class": c, "count": classes.count(c), "percent": round(100.0 * classes.count(c) / total, 2)
             if total else 0.0} for c in order]


def marker_options(channels, thresholds="auto", names=None) -> tuple[list, Optional[list], Optional[list]]:
    """``(channels, thresholds or None for automatic, names or None)`` from the command line's
    ``--measure-channels 1,2 --thresholds auto|V1,V2 --marker-names A,B`` (strings or sequences), checked.

    Examples
    --------
    >>> marker_options("1,2", "auto", "Ki67,EdU")
    ([1, 2], None, ['Ki67', 'EdU'])
    >>> marker_options("1", "x")
    Traceback (most recent call last):
    ...
    ValueError: --thresholds takes 'auto' or numbers separated by commas, got 'x'
    """
    def parts(v) -> list:
        return [t.strip() for t in v.split(",")] if isinstance(v, str) else list(v)

    if channels is None or (isinstance(channels, str) and not channels.strip()):
        if names or (thresholds is not None and thresholds != "auto"):
            raise ValueError("--thresholds and --marker-names go with --measure-channels")
        return [], None, None
    try:
        chans = [int(v) for v in parts(channels) if str(v).strip()]
    except ValueError:
        raise ValueError(f"--measure-channels takes channel numbers separated by commas, e.g. 1,2; got "
                         f"{channels!r}") from None
    if not chans or any(c < 0 for c in chans):
        raise ValueError(f"--measure-channels takes channel numbers (0, 1, ...), got {channels!r}")
    values = None
    if thresholds is not None and thresholds != "auto":
        try:
            values = [float(v) for v in parts(thresholds)]
        except (TypeError, ValueError):
            raise ValueError(f"--thresholds takes 'auto' or numbers separated by commas, got {thresholds!r}") \
                from None
        if len(values) != len(chans) or not all(np.isfinite(values)):
            raise ValueError(f"--thresholds needs one finite number per measured channel ({len(chans)}), got "
                             f"{thresholds!r}")
    labels = None
    if names:
        labels = [str(v).strip() for v in parts(names)]
        if len(labels) != len(chans) or not all(labels):
            raise ValueError(f"--marker-names needs one name per measured channel ({len(chans)}), got {names!r}")
    return chans, values, labels


def class_columns(means: np.ndarray, thresholds: Optional[Sequence[float]], names: Sequence[str]) -> dict:
    """The marker columns of a table row for one image's nuclei: ``{"<class>": count, "<class> %": percent}``
    for every class, plus ``"threshold <name>"`` per channel (automatic where ``thresholds`` is None).

    An image without nuclei gets zero counts and empty thresholds.
    """
    m = np.asarray(means, float).reshape(-1, len(names))
    if thresholds is None:
        try:
            thresholds = auto_thresholds(m)
        except ValueError:  # too few nuclei to choose: no threshold, every class empty
            thresholds = None
    row = {f"threshold {n}": (None if thresholds is None else round(float(t), 4))
           for n, t in zip(names, thresholds if thresholds is not None else [None] * len(names))}
    classes = classify(m, thresholds, names) if thresholds is not None else []
    for c in class_counts(list(classes), names):
        row[c["class"]], row[f"{c['class']} %"] = c["count"], c["percent"]
    return row
