"""One set of counter settings: every path (count, adapt, retrain, export) reads them through CounterConfig."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import numpy as np
import pytest

from cellsynth.count.counter import DEFAULTS, CounterConfig, counter_config

SRC = Path(__file__).resolve().parents[2] / "src" / "cellsynth"
SETTINGS = {"in_chans", "diameter", "blocks", "sigma", "density_scale", "peak_threshold", "window", "rescale"}


def test_new_configs_and_missing_settings_share_one_set_of_defaults():
    cfg = counter_config("density")
    assert {k: cfg[k] for k in ("in_chans", "diameter", "blocks", "sigma", "density_scale", "peak_threshold")} \
        == {k: DEFAULTS[k] for k in ("in_chans", "diameter", "blocks", "sigma", "density_scale", "peak_threshold")}
    bare = CounterConfig.of({"kind": "density"})
    for key in SETTINGS:
        assert getattr(bare, key) == DEFAULTS[key], key


def test_no_module_reads_a_setting_with_a_default_of_its_own():
    """``config.get("density_scale", 1.0)`` here and ``100.0`` there was how the paths came to disagree."""
    found = []
    for path in SRC.rglob("*.py"):
        if path.name == "counter.py" and path.parent.name == "count":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                    and len(node.args) == 2 and isinstance(node.args[0], ast.Constant)
                    and node.args[0].value in SETTINGS and isinstance(node.args[1], ast.Constant)):
                found.append(f"{path.relative_to(SRC)}:{node.lineno} {node.args[0].value}")
    assert not found, found


@pytest.mark.parametrize("key", ["density_scale", "sigma", "peak_threshold"])
def test_a_config_without_a_setting_counts_adapts_and_exports_as_with_the_default(tmp_path, key):
    import torch

    from cellsynth.adapt._train import make_item
    from cellsynth.count import count_cells
    from cellsynth.count._nets import build_net
    from cellsynth.count.models import load_counter, save_counter

    torch.manual_seed(0)
    full = counter_config("density", backbone="test_efficientnet", blocks=3)
    net = build_net(full)
    save_counter(net, full, tmp_path / "full")
    bare = copy.deepcopy(full)
    del bare[key]
    save_counter(net, bare, tmp_path / "bare")
    a, b = load_counter(tmp_path / "full", device="cpu"), load_counter(tmp_path / "bare", device="cpu")
    assert a.settings == b.settings
    img = np.zeros((64, 64), np.float32)
    img[20:30, 20:30] = 1.0
    ra = count_cells(img, counter=a, diameter=15.0, engine="torch")
    rb = count_cells(img, counter=b, diameter=15.0, engine="torch")
    assert ra.density_sum == rb.density_sum and np.array_equal(ra.points, rb.points)
    ta = make_item(img, np.array([[25.0, 25.0]]), full).target
    tb = make_item(img, np.array([[25.0, 25.0]]), bare).target
    assert np.array_equal(ta, tb)
