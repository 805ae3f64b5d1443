"""The Counting loop on a real image, for a look or a screenshot.

``python -m cellsynth._napari.loop_demo [--screenshot OUT.png]`` opens napari with the
shipped real nuclei image, docks the Counting loop widget, counts the image with the
default counter at the estimated diameter and marks one checked region, as a person
would after steps 1 to 4.
"""

from __future__ import annotations

import sys
from typing import Optional

__all__ = ["open_loop_viewer", "main"]


def open_loop_viewer(*, show: bool = True):
    """A viewer with the real sample image, the Counting loop docked and one count made."""
    import napari

    from .loop_widget import LoopWidget, regions_name
    from .sample import sample_nuclei

    viewer = napari.Viewer(title="CellSynth: counting loop", show=show)
    for data, kwargs, kind in sample_nuclei():
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    loop = LoopWidget(viewer)
    viewer.window.add_dock_widget(loop, name="Counting loop", area="right")
    loop.count()
    loop.runner.wait(300000)
    image = loop.image.value
    loop.mark_regions()
    shapes = viewer.layers[regions_name(image.name)]
    shapes.add_rectangles([[40.0, 40.0], [200.0, 260.0]])
    shapes.mode = "pan_zoom"
    viewer.layers.selection.active = viewer.layers[f"{image.name} cells"]
    return viewer, loop


def main(argv: Optional[list] = None) -> int:
    from .demo import screenshot_main

    return screenshot_main(argv, module="cellsynth._napari.loop_demo", doc=__doc__, size=(1400, 1000),
                           open_window=lambda a: open_loop_viewer(show=True)[0])


if __name__ == "__main__":
    sys.exit(main())
