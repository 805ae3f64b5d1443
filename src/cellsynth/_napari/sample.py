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


def sample_nuclei() -> list:
    """A real image of cultured neurons with a nuclear stain (383x512, 8-bit; scellseg's neurocyte set, BSD-3)."""
    from ..io import read_tiff
    from ..weights import resources_dir

    path = resources_dir() / "samples" / "neurocyte_010.tif"
    meta = {"source": "scellseg neurocyte example set (BSD-3-Clause)", "path": str(path)}
    data, _ = read_tiff(path)
    return [(data, {"name": "neurocyte_010", "metadata": meta, "colormap": "gray"}, "image")]
