"""``cellsynth demo``: napari with every CellSynth widget and every sample (the layout shown, the others listed)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

PLUGIN = "napari-cellsynth"


#: The docks in the order of their tabs: counting first, where a newcomer starts.
DOCK_ORDER = ("Count cells", "Counting loop", "Cell layouts", "Stylize (InST)", "Virtual staining", "NSC masks")
#: The input each dock starts with: (widget attribute, layer name) of its own sample.
PRESELECT = {"Count cells": [("image", "neurocyte_010")], "Counting loop": [("image", "neurocyte_010")],
             "Stylize (InST)": [("content", "content (layout)"), ("style", "style (real nuclei)")],
             "Virtual staining": [("layer", "brightfield (simulated)")],
             "NSC masks": [("layer", "brightfield (simulated)")]}
#: Docks whose sample is a focus stack: it is opened when the dock is first shown (a stack brings a slider).
STACK_DOCKS = ("Virtual staining", "NSC masks")


def open_viewer(*, seed: int = 0, show: bool = True):
    """A napari viewer with every plugin widget docked, starting on Count cells with the real nuclei sample.

    The nuclei image is shown and Count cells is the tab in front; the tabs run
    down the right edge with their full names. The other samples (a layout,
    the layout and style image of Stylize) are in the layer list, hidden, and
    every dock starts with its own sample chosen. The simulated brightfield
    focus stack of Virtual staining and NSC masks is opened when one of those
    docks is first shown, so that its plane slider does not sit under a 2D image
    before then.
    """
    import napari
    from qtpy.QtCore import Qt, QTimer
    from qtpy.QtWidgets import QTabWidget

    from .sample import sample_layout, sample_nuclei, sample_stylize

    viewer = napari.Viewer(title="CellSynth", show=show)
    for data, kwargs, kind in sample_layout(seed) + sample_stylize(seed):
        getattr(viewer, f"add_{kind}")(data, **dict(kwargs, visible=False))
    for data, kwargs, kind in sample_nuclei():
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    docks, widgets = {}, {}
    for name in DOCK_ORDER:
        docks[name], widgets[name] = viewer.window.add_plugin_dock_widget(PLUGIN, name, tabify=True)
        docks[name].setWindowTitle(name)  # the tab's text: the plugin's name is in the Plugins menu already
    window = docks["Count cells"].window()  # napari's main window, without reaching into napari's private names
    window.setTabPosition(Qt.DockWidgetArea.RightDockWidgetArea, QTabWidget.TabPosition.East)
    for name, picks in PRESELECT.items():
        if name not in STACK_DOCKS:
            _preselect(viewer, widgets[name], picks)

    def open_stack(visible: bool) -> None:
        if not visible or "brightfield (simulated)" in viewer.layers:
            return
        viewer.open_sample(PLUGIN, "brightfield")
        for other in STACK_DOCKS:
            _preselect(viewer, widgets[other], PRESELECT[other])

    for name in STACK_DOCKS:
        docks[name].visibilityChanged.connect(open_stack)
    docks["Count cells"].raise_()
    QTimer.singleShot(200, docks["Count cells"].raise_)  # napari raises each new tab once the loop runs
    viewer.layers.selection.active = viewer.layers["neurocyte_010"]
    return viewer


def _preselect(viewer, widget, picks) -> None:
    for attr, layer in picks:
        if layer in viewer.layers:
            getattr(widget, attr).value = viewer.layers[layer]


def require_display(screenshot: bool) -> None:
    """Refuse to start Qt where it cannot open a window (it would abort the process with a core dump).

    On Linux a window needs an X server (``DISPLAY``) or a Wayland compositor
    (``WAYLAND_DISPLAY``), unless ``QT_QPA_PLATFORM`` names another platform.
    """
    import os
    import sys

    if not sys.platform.startswith("linux") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return
    if os.environ.get("QT_QPA_PLATFORM", "xcb").split(":")[0] not in ("xcb", "wayland"):
        return
    how = ("run it under a virtual X server: xvfb-run -a cellsynth demo --screenshot PNG" if screenshot else
           "run it on a desktop, or take a screenshot without one: xvfb-run -a cellsynth demo --screenshot PNG")
    raise ValueError(f"no display to open the napari window on (DISPLAY is not set); {how}")


def run_demo(*, screenshot: Optional[str] = None, seed: int = 0) -> int:
    """Open the demo window; with ``screenshot``, save the drawn window to that PNG and exit."""
    out = Path(screenshot) if screenshot is not None else None
    if out is not None and out.exists():
        raise FileExistsError(f"{out} already exists; choose another screenshot path")
    require_display(out is not None)
    return show_or_screenshot(open_viewer(seed=seed, show=True), out, size=(1400, 900))


def show_or_screenshot(viewer, out: Optional[Path], *, size: tuple[int, int]) -> int:
    """Run napari with ``viewer``; with ``out``, save the drawn window (``size``) to that PNG and exit."""
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    if out is None:
        napari.run()
        return 0
    viewer.window.resize(*size)
    app = QApplication.instance()

    def shoot() -> None:
        for _ in range(20):
            app.processEvents()
        viewer.reset_view()
        app.processEvents()
        viewer.screenshot(str(out), canvas_only=False)
        viewer.close()
        app.quit()

    QTimer.singleShot(1500, shoot)
    napari.run()
    if not out.is_file():
        raise RuntimeError(f"no screenshot was written to {out}")
    print(f"screenshot saved to {out}")
    return 0


def screenshot_main(argv: Optional[list], *, module: str, doc: str, open_window, size: tuple[int, int],
                    extra=None) -> int:
    """The command line of a demo window: ``python -m MODULE [--screenshot OUT.png]`` (plus ``extra(parser)``'s
    options); ``open_window(args) -> viewer``. An existing screenshot path is refused, nothing replaced."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n")[0])
    parser.add_argument("--screenshot", type=Path, help="save the window to this PNG and exit")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    if args.screenshot is not None and args.screenshot.exists():
        print(f"error: {args.screenshot} already exists; choose another screenshot path", file=sys.stderr)
        return 2
    return show_or_screenshot(open_window(args), args.screenshot, size=size)
