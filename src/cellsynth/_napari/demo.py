"""``cellsynth demo``: napari with every CellSynth widget and every sample (the layout shown, the others listed)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

PLUGIN = "napari-cellsynth"


def open_viewer(*, seed: int = 0, show: bool = True):
    """A napari viewer with every plugin widget docked and every sample open.

    The sample layout (``seed``) is shown; the layers of the other samples (real
    nuclei, simulated brightfield stack with its fluorescence, layout and style
    image) are in the layer list, hidden, ready for the widgets they are for.
    """
    import napari
    from npe2 import PluginManager

    from .sample import sample_layout

    viewer = napari.Viewer(title="CellSynth", show=show)
    manifest = PluginManager.instance().get_manifest(PLUGIN)
    for contrib in manifest.contributions.sample_data or []:
        if contrib.key == "layout":
            continue
        before = len(viewer.layers)
        viewer.open_sample(PLUGIN, contrib.key)
        for layer in list(viewer.layers)[before:]:
            layer.visible = False
    for data, kwargs, kind in sample_layout(seed):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    for widget in manifest.contributions.widgets or []:
        viewer.window.add_plugin_dock_widget(PLUGIN, widget.display_name, tabify=True)
    return viewer


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
