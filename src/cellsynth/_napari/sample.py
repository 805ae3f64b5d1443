"""Sample data contribution "Synthetic cell layout" (generated locally, no download)."""

from __future__ import annotations

from ._layers import provenance


def sample_layout(seed: int = 0) -> list:
    """One default 256x256 Syn-HC layout as Image, Labels and Points layer data."""
    from ..layouts import LayoutParams, generate_layout

    params = LayoutParams()
    lay = generate_layout(params, rng=seed)
    meta = provenance("layouts.generate", params=params.to_dict(), seed=seed, n_cells=lay.n_cells)
    feats = {c: v for c, v in lay.cells.items() if c not in ("label", "row", "col")}
    return [
        (lay.image, {"name": "layout", "metadata": meta, "colormap": "gray", "contrast_limits": (0, 255)}, "image"),
        (lay.labels, {"name": "layout cells", "metadata": meta, "opacity": 0.3}, "labels"),
        (lay.centres, {"name": "layout centres", "metadata": meta, "features": feats, "size": 5,
                       "face_color": "yellow", "border_width": 0}, "points"),
    ]
