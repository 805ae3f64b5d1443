"""Sample data for every widget, shipped with the package (nothing is downloaded).

=====================  =====================================  ==========================================
sample                 for                                    what
=====================  =====================================  ==========================================
``layout``             Cell layouts, Stylize (content)        a Syn-HC layout generated here (seed 0)
``nuclei``             Count cells, Counting loop             a real fluorescence image of nuclei
``brightfield``        Virtual staining, NSC masks            a simulated brightfield focus stack with
                                                              the fluorescence it was rendered with
``stylize``            Stylize (InST)                         a layout to restyle and a real style image
=====================  =====================================  ==========================================

:func:`make_samples` writes the stored files of ``resources/samples/`` that the
product renders itself (``python -m cellsynth._napari.sample OUT``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ._layers import provenance

__all__ = ["sample_layout", "sample_nuclei", "sample_brightfield", "sample_stylize", "make_samples", "SAMPLES"]

#: Stored sample files (under ``resources/samples``) and how they were made.
BRIGHTFIELD_FILE = "brightfield_sim.tif"
FLUORESCENCE_FILE = "fluorescence_sim.tif"
NUCLEI_FILE = "neurocyte_010.tif"
STYLE_FILE = "style_neurocyte_256.tif"
#: Seed of the simulated field of view: outside the stain-demo model's training (0) and held-out (1000003) seeds.
BRIGHTFIELD_SEED = 2024
#: Sample key -> the widgets it is meant for (display names in napari.yaml).
SAMPLES = {
    "layout": ("Cell layouts",),
    "nuclei": ("Count cells", "Counting loop"),
    "brightfield": ("Virtual staining", "NSC masks"),
    "stylize": ("Stylize (InST)",),
}


def _samples_dir() -> Path:
    from ..weights import resources_dir

    return resources_dir() / "samples"


def _read(name: str) -> np.ndarray:
    from ..io import read_tiff

    data, _ = read_tiff(_samples_dir() / name)
    return np.asarray(data)


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
    path = _samples_dir() / NUCLEI_FILE
    meta = {"source": "scellseg neurocyte example set (BSD-3-Clause)", "path": str(path)}
    return [(_read(NUCLEI_FILE), {"name": "neurocyte_010", "metadata": meta, "colormap": "gray"}, "image")]


def sample_brightfield() -> list:
    """A simulated brightfield focus stack (3, 128, 128) and, hidden, the five fluorescence channels behind it.

    The stack is what the Virtual staining and NSC masks widgets take; the
    fluorescence layers (named ``<channel> (simulated truth)``) let one compare
    a virtual stain with what the simulator rendered.
    """
    from ..stain.simulate import CHANNELS, PLANES

    bf, fl = _read(BRIGHTFIELD_FILE), _read(FLUORESCENCE_FILE)
    meta = {"source": "cellsynth.stain.simulate.simulate_stain_pair((128, 128), rng=2024)",
            "planes": list(PLANES), "channels": list(CHANNELS)}
    layers = [(bf, {"name": "brightfield (simulated)", "metadata": meta, "colormap": "gray"}, "image")]
    colours = ("blue", "green", "yellow", "magenta", "red")
    for c, name, colour in zip(fl, CHANNELS, colours):
        layers.append((c, {"name": f"{name} (simulated truth)", "metadata": meta, "colormap": colour,
                           "blending": "additive", "visible": False}, "image"))
    return layers


def sample_stylize(seed: int = 0) -> list:
    """A layout to restyle (content) and a 256x256 crop of the real nuclei image (style)."""
    content = sample_layout(seed)[0]
    path = _samples_dir() / STYLE_FILE
    meta = {"source": "crop of scellseg neurocyte_010 (BSD-3-Clause)", "path": str(path)}
    data, kwargs, kind = content
    content = (data, dict(kwargs, name="content (layout)"), kind)
    return [content, (_read(STYLE_FILE), {"name": "style (real nuclei)", "metadata": meta, "colormap": "gray"},
                      "image")]


def make_samples(out: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Write the sample files this product renders itself to the folder ``out``.

    ``brightfield_sim.tif`` (3 focus planes, uint16) and ``fluorescence_sim.tif``
    (DNA, ER, RNA, AGP, Mito, uint16) from one simulated 128x128 field of view
    (seed :data:`BRIGHTFIELD_SEED`); ``style_neurocyte_256.tif``, the 256x256
    crop of the real nuclei image at rows 64-320, columns 128-384.
    """
    from ..io import write_tiff
    from ..stain.simulate import simulate_stain_pair

    out = Path(out)
    pair = simulate_stain_pair((128, 128), rng=BRIGHTFIELD_SEED)
    nuclei = _read(NUCLEI_FILE)
    written = [
        write_tiff(out / BRIGHTFIELD_FILE, pair.brightfield, overwrite=overwrite),
        write_tiff(out / FLUORESCENCE_FILE, pair.fluorescence, overwrite=overwrite),
        write_tiff(out / STYLE_FILE, np.ascontiguousarray(nuclei[64:320, 128:384]), overwrite=overwrite),
    ]
    return written


if __name__ == "__main__":  # pragma: no cover
    for p in make_samples(sys.argv[1], overwrite="--overwrite" in sys.argv):
        print(f"wrote {p} ({p.stat().st_size / 1e3:.0f} kB)")
