"""Adding or updating result layers in place, with provenance."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

__all__ = ["upsert_layer", "provenance", "layer_class", "on_layer_renamed", "robust_limits", "real_viewer"]


def real_viewer(viewer):
    """The viewer itself, where napari handed a widget a proxy of it.

    napari gives widgets opened from the Plugins menu a ``PublicOnlyProxy`` of
    the viewer, and every layer read through it is a new proxy object: ``is``
    between two reads of the same layer is False, an ``id`` differs on each
    read, and each attribute access inspects the caller's frame. The widgets
    compare layers by identity (which result belongs to which image, which
    layer's clicks to follow), so they keep the viewer behind the proxy and use
    its public API only.
    """
    return getattr(viewer, "__wrapped__", viewer)


def provenance(operation: str, **fields: Any) -> dict:
    """The ``metadata["cellsynth"]`` record of a result layer."""
    from .. import __version__

    return {"cellsynth": {"operation": operation, "version": __version__, **fields}}


def upsert_layer(viewer, name: str, layer_type: str, data: Any, *, metadata: Optional[dict] = None,
                 features: Any = None, like=None, **kwargs: Any):
    """Update the layer called ``name`` if it has this type, else add a new one.

    Parameters
    ----------
    viewer : napari.Viewer
    name : str
        Layer name; re-running an operation finds its layer by name.
    layer_type : {"image", "labels", "points"}
    data : array-like
    metadata : dict, optional
        Merged into the layer's metadata.
    features : dict or DataFrame, optional
        Points features (set after the data).
    like : napari layer, optional
        Input layer whose ``scale`` and ``translate`` are copied.
    **kwargs
        Passed to ``viewer.add_<layer_type>`` when the layer is created.
    """
    if like is not None:
        ndim = np.shape(data)[-1] if layer_type == "points" else np.ndim(data)
        kwargs.setdefault("scale", tuple(like.scale[-ndim:]))
        kwargs.setdefault("translate", tuple(like.translate[-ndim:]))
    layer = viewer.layers[name] if name in viewer.layers else None
    if layer is not None and not isinstance(layer, layer_class(layer_type)):
        layer = None
        name = _free_name(viewer, name)
    if layer is None:
        add = getattr(viewer, f"add_{layer_type}")
        extra = {"features": features} if features is not None else {}
        layer = add(data, name=name, metadata=dict(metadata or {}), **extra, **kwargs)
        return layer
    layer.data = data
    if features is not None:
        layer.features = features
    for key in ("scale", "translate"):  # set only when changed: each set redraws the layer
        if key in kwargs and not np.array_equal(np.asarray(getattr(layer, key), float), np.asarray(kwargs[key], float)):
            setattr(layer, key, kwargs[key])
    limits = kwargs.get("contrast_limits")
    if limits is not None and hasattr(layer, "contrast_limits") and not np.allclose(layer.contrast_limits, limits):
        layer.contrast_limits = limits  # a re-run's data has its own range
    layer.metadata = {**layer.metadata, **(metadata or {})}
    return layer


def robust_limits(data: Any, low: float = 1.0, high: float = 99.8, max_samples: int = 1 << 20) -> tuple:
    """Contrast limits at the ``low``/``high`` percentiles of an image, from at most ``max_samples`` pixels.

    Meant for worker threads: a layer added with these limits needs no reduction over its
    data on the GUI thread, and a few bright outliers do not dim everything else.

    Examples
    --------
    >>> robust_limits(np.arange(1001.0), low=10, high=90)
    (100.0, 900.0)
    >>> robust_limits(np.zeros((4, 4)))
    (0.0, 1.0)
    """
    a = np.asarray(data)
    step = max(1, int(np.ceil(a.size / max_samples)))
    sample = a.reshape(-1)[::step]
    sample = sample[np.isfinite(sample)] if sample.dtype.kind == "f" else sample
    if sample.size == 0:
        return (0.0, 1.0)
    lo, hi = (float(v) for v in np.percentile(sample, (low, high)))
    if not hi > lo:
        hi = lo + 1.0
    return (lo, hi)


def on_layer_renamed(viewer, callback) -> None:
    """Call ``callback()`` whenever a layer of ``viewer`` is renamed, layers added later included.

    Widgets use it to keep their layer pickers showing the current names.
    """
    def safe(*_: Any) -> None:
        try:
            callback()
        except RuntimeError:  # the widget was closed
            pass

    def hook(layer) -> None:
        layer.events.name.connect(safe)

    for layer in viewer.layers:
        hook(layer)
    viewer.layers.events.inserted.connect(lambda event: hook(event.value))


def layer_class(layer_type: str):
    """napari's layer class for ``"image"``, ``"labels"``, ``"points"`` or ``"shapes"`` (public API only)."""
    from napari import layers

    return {"image": layers.Image, "labels": layers.Labels, "points": layers.Points,
            "shapes": layers.Shapes}[layer_type]


def _free_name(viewer, name: str) -> str:
    i = 1
    while f"{name} [{i}]" in viewer.layers:
        i += 1
    return f"{name} [{i}]"
