"""Cells per region and marker-positive classes on a two-channel image, for a look or a screenshot.

``python -m cellsynth._napari.report_demo [--screenshot OUT.png] [--out DIR]`` opens napari
with a synthetic two-channel image whose truth is known (nuclei in ``DAPI``, a nuclear
marker in ``Ki67`` for some of them), counts it with the Count dock at the given
diameter, draws two regions (a rectangle and an ellipse), classifies the nuclei by
the ``Ki67`` channel (Otsu's threshold on the per-nucleus means) and, with ``--out``,
exports the region table and the points (with their class and region) as CSV, as a
person would with the dock's buttons.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = ["two_channel_image", "REGIONS", "open_report_viewer", "write_regions_csv", "main"]

#: The regions drawn, in pixels: a rectangle over the left third, an ellipse in the right half.
REGIONS = {"rectangle": np.array([[0, 0], [0, 127], [255, 127], [255, 0]], float),
           "ellipse": np.array([[32, 200], [32, 370], [224, 370], [224, 200]], float)}
DIAMETER = 14.0


def two_channel_image(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image (2, 256, 384) uint16, nucleus centres (N, 2), marker-positive flags (N,))``.

    Nuclei of 14 px on a jittered grid with uneven brightness in channel 0; about a
    third of them carry the marker in channel 1 at several brightnesses (the others
    a faint background inside the nucleus).
    """
    from skimage.draw import disk
    from skimage.filters import gaussian

    rng = np.random.default_rng(seed)
    centres = np.array([(24 + 34 * i + rng.uniform(-6, 6), 24 + 34 * j + rng.uniform(-6, 6))
                        for i in range(7) for j in range(11)])
    positive = rng.random(len(centres)) < 0.35
    img = np.zeros((2, 256, 384), float)
    for c, pos in zip(centres, positive):
        rr, cc = disk(tuple(c), DIAMETER / 2, shape=img.shape[1:])
        img[0, rr, cc] += rng.uniform(500, 1200)
        img[1, rr, cc] += rng.uniform(400, 900) if pos else rng.uniform(20, 60)
    img = np.stack([gaussian(ch, 1.0, preserve_range=True) for ch in img])
    img += rng.normal(100, 10, img.shape)
    return np.clip(img, 0, 65535).astype(np.uint16), centres, positive


def open_report_viewer(viewer=None, *, show: bool = True, out: Optional[Path] = None):
    """``(viewer, count dock)``: the image counted, two regions drawn, Ki67 classified (and exported to ``out``).

    ``viewer``: an open one to use (default: a new window).
    """
    import napari

    from ._counting import result_name
    from .count_widget import CountWidget

    image, _, _ = two_channel_image()
    if viewer is None:
        viewer = napari.Viewer(title="CellSynth: cells per region and marker classes", show=show)
    viewer.add_image(image, channel_axis=0, name=["DAPI", "Ki67"], colormap=["blue", "magenta"],
                     blending="additive")
    dock = CountWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Count cells", area="right")
    dock.image.value = viewer.layers["DAPI"]
    dock.diameter.value.value = DIAMETER
    dock.run()
    dock.runner.wait(300000)
    shapes = viewer.add_shapes(list(REGIONS.values()), shape_type=list(REGIONS), name="regions",
                               edge_color="yellow", face_color="transparent", edge_width=2)
    dock.regions.shapes.value = shapes
    dock.markers.markers.value = [("layer", "Ki67")]
    dock.markers.classify()
    if out is not None:
        from .points_io import write_points

        out.mkdir(parents=True, exist_ok=True)
        dock.regions.export(str(out / "regions.csv"))
        pts = viewer.layers[result_name("DAPI")]
        write_points(str(out / "cells.csv"), pts.data, {"features": pts.features, "scale": pts.scale,
                                                       "translate": pts.translate, "metadata": pts.metadata})
    viewer.layers.selection.active = viewer.layers[result_name("DAPI")]
    return viewer, dock


def write_regions_csv(path: Path) -> Path:
    """:data:`REGIONS` as napari's shapes CSV (what ``File > Save Selected Layers`` writes)."""
    lines = ["index,shape-type,vertex-index,axis-0,axis-1"]
    for i, (kind, v) in enumerate(REGIONS.items()):
        lines += [f"{i},{kind},{k},{r:g},{c:g}" for k, (r, c) in enumerate(v)]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def main(argv: Optional[list] = None) -> int:
    from .demo import screenshot_main

    def extra(parser) -> None:
        parser.add_argument("--out", type=Path, help="export the region table and the points to this folder")

    return screenshot_main(argv, module="cellsynth._napari.report_demo", doc=__doc__, size=(1500, 1350),
                           open_window=lambda a: open_report_viewer(show=True, out=a.out)[0], extra=extra)


if __name__ == "__main__":
    sys.exit(main())
