"""Datasets made item by item on dask.distributed (kept for one release: the code moved).

:func:`run_in_order` is in :mod:`cellsynth._cluster`, :func:`layouts_on_cluster` in
:mod:`cellsynth.layouts.dataset` and :class:`StylizeOnCluster` in
:mod:`cellsynth.stylize.dataset`, each beside the dataset it writes: the writers no
longer reach up into this package.
"""

from __future__ import annotations

from .._cluster import run_in_order

__all__ = ["run_in_order", "layouts_on_cluster", "StylizeOnCluster"]


def __getattr__(name: str):
    if name == "layouts_on_cluster":
        from ..layouts.dataset import layouts_on_cluster

        return layouts_on_cluster
    if name == "StylizeOnCluster":
        from ..stylize.dataset import StylizeOnCluster

        return StylizeOnCluster
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
