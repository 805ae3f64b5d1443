import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


@pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs an X server (pytest-xvfb provides one)")
def test_demo_screenshot_shows_the_window(tmp_path):
    out = tmp_path / "demo.png"
    exe = Path(sys.executable).with_name("cellsynth")
    res = subprocess.run([str(exe), "demo", "--screenshot", str(out)], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    from imageio.v3 import imread

    img = imread(out)
    assert img.ndim == 3 and img.shape[0] >= 600 and img.shape[1] >= 1000
    gray = img[..., :3].mean(axis=2)
    assert gray.std() > 20  # not a blank window
    # the canvas shows the layout: many distinct intensities, not a flat fill
    assert len(np.unique(img[..., :3].reshape(-1, 3), axis=0)) > 500
    # a second run refuses to overwrite the screenshot
    again = subprocess.run([str(exe), "demo", "--screenshot", str(out)], capture_output=True, text=True, timeout=180)
    assert again.returncode == 2 and "already exists" in again.stderr


@pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs an X server (pytest-xvfb provides one)")
def test_napari_with_every_widget_docked_does_not_import_torch():
    script = (
        "import sys\n"
        "from cellsynth._napari.demo import open_viewer\n"
        "viewer = open_viewer(show=False)\n"
        "print(len(viewer.window._dock_widgets))\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'timm') if m in sys.modules))\n"
        "viewer.close()\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    docks, heavy = res.stdout.strip().splitlines()[-2:]
    assert int(docks) >= 5 and heavy == "[]"


def test_demo_starts_on_counting_with_each_dock_on_its_own_sample(qtbot):
    """What a newcomer sees first: Count cells on the real nuclei, full tab names, no plane slider."""
    from qtpy.QtWidgets import QTabBar

    from cellsynth._napari.demo import DOCK_ORDER, open_viewer

    viewer = open_viewer(show=True)
    try:
        qtbot.wait(400)
        docks = {name.replace(" (napari-cellsynth)", ""): dw for name, dw in viewer.window._dock_widgets.items()}
        widgets = {name: docks[name].widget() for name in docks}
        assert list(docks) == list(DOCK_ORDER)
        assert [lay.name for lay in viewer.layers if lay.visible] == ["neurocyte_010"]
        assert viewer.dims.ndim == 2  # no slider under the canvas
        tabs = [bar for bar in viewer.window._qt_window.findChildren(QTabBar) if bar.count() == len(DOCK_ORDER)]
        assert tabs and [tabs[0].tabText(i) for i in range(tabs[0].count())] == list(DOCK_ORDER)
        assert tabs[0].tabText(tabs[0].currentIndex()) == "Count cells"
        count = next(w for w in (widgets["Count cells"], *widgets["Count cells"].findChildren(object))
                     if hasattr(w, "run_button"))
        assert count.image.value.name == "neurocyte_010"
        # the staining docks open their focus stack when first shown, chosen in both
        docks["Virtual staining"].raise_()
        qtbot.waitUntil(lambda: "brightfield (simulated)" in viewer.layers, timeout=10000)
        for name in ("Virtual staining", "NSC masks"):
            w = next(w for w in (widgets[name], *widgets[name].findChildren(object)) if hasattr(w, "layer"))
            assert w.layer.value.name == "brightfield (simulated)"
    finally:
        viewer.close()
