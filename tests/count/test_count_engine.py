"""onnxruntime runs the counter network on the CPU: same results as PyTorch, cached exports, fallbacks."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cellsynth.count import engines, count_cells, load_counter
from cellsynth.count._nets import build_net
from cellsynth.count.models import Counter, counter_config, save_counter, to_device
from cellsynth.count.synth import SynthParams, synthetic_nuclei

pytestmark = pytest.mark.skipif(not engines.available(), reason="onnxruntime is not installed")


@pytest.fixture(autouse=True)
def _no_exports_in_memory(monkeypatch):
    """Exports kept in this process by earlier tests (e.g. of the same seeded tiny counter) stay out of these."""
    monkeypatch.setattr(engines, "_MEMORY", {})


@pytest.fixture(scope="module")
def image():
    img, centres, _ = synthetic_nuclei(SynthParams(shape=(200, 260), diameter=(12, 14), coverage=(0.2, 0.25)), rng=5)
    return (img * 3000).astype(np.uint16), centres


def _tiny(tmp_path, kind="density"):
    torch.manual_seed(0)
    cfg = counter_config(kind, backbone="test_efficientnet", **({"blocks": 3} if kind == "density" else {}))
    return load_counter(save_counter(build_net(cfg), cfg, tmp_path / kind), device="cpu")


@pytest.mark.parametrize("model", ["default", "tiny-density", "tiny-regression"])
def test_onnxruntime_counts_exactly_as_pytorch(model, image, tmp_path, one_torch_thread):
    counter = load_counter("default", device="cpu") if model == "default" else _tiny(tmp_path, model.split("-")[1])
    img, _ = image
    ref = count_cells(img, counter=counter, diameter=13.0, tile=128, engine="torch")
    got = count_cells(img, counter=counter, diameter=13.0, tile=128)  # "auto": onnxruntime on the CPU
    assert ref.meta["engine"] == "torch" and got.meta["engine"] == "onnxruntime"
    assert got.count == pytest.approx(ref.count, rel=1e-5, abs=1e-6)  # an int for density counters
    if ref.density is not None:
        np.testing.assert_allclose(got.density, ref.density, atol=1e-5 * max(1e-6, float(ref.density.max())))
        np.testing.assert_allclose(got.points, ref.points, atol=1e-3)
    else:
        assert [w[-1] for w in got.windows] == pytest.approx([w[-1] for w in ref.windows], rel=1e-4, abs=1e-4)


def test_exports_are_cached_on_disk_by_weights_and_a_damaged_file_is_replaced(image, tmp_path, monkeypatch,
                                                                              one_torch_thread):
    monkeypatch.setenv("CELLSYNTH_ONNX_CACHE", str(tmp_path / "cache"))
    img, _ = image
    counter = _tiny(tmp_path)
    first = count_cells(img, counter=counter, diameter=13.0)
    files = list((tmp_path / "cache").glob("*.onnx"))
    assert len(files) == 1 and first.meta["engine"] == "onnxruntime"

    def no_export(*a, **k):
        raise AssertionError("exported again")

    real_export = engines._export
    monkeypatch.setattr(engines, "_export", no_export)
    again = load_counter(counter.path, device="cpu")  # a new process would load the file like this
    assert count_cells(img, counter=again, diameter=13.0).count == first.count
    # other weights: another file (the old export is never used for them)
    with torch.no_grad():
        again.net.head.bias.add_(0.5)
    monkeypatch.setattr(engines, "_export", real_export)
    changed = count_cells(img, counter=again, diameter=13.0)
    assert len(list((tmp_path / "cache").glob("*.onnx"))) == 2
    assert changed.density_sum != pytest.approx(first.density_sum)
    # a damaged cache file is exported anew, not trusted
    files[0].write_bytes(b"not an onnx file")
    fresh = load_counter(counter.path, device="cpu")
    assert count_cells(img, counter=fresh, diameter=13.0).count == first.count
    assert files[0].stat().st_size > 1000


def test_engine_choice_and_fallbacks(image, tmp_path, monkeypatch, one_torch_thread):
    img, _ = image
    counter = _tiny(tmp_path)
    monkeypatch.setenv("CELLSYNTH_ENGINE", "torch")
    assert count_cells(img, counter=counter, diameter=13.0).meta["engine"] == "torch"
    monkeypatch.setenv("CELLSYNTH_ENGINE", "fast")
    with pytest.raises(ValueError, match="CELLSYNTH_ENGINE"):
        count_cells(img, counter=counter, diameter=13.0)
    monkeypatch.delenv("CELLSYNTH_ENGINE")
    with pytest.raises(ValueError, match="engine must be one of"):
        count_cells(img, counter=counter, diameter=13.0, engine="tensorrt")
    # without onnxruntime: "auto" counts with PyTorch, asking for it explicitly is a clear error
    monkeypatch.setattr(engines, "available", lambda: False)
    assert count_cells(img, counter=counter, diameter=13.0).meta["engine"] == "torch"
    with pytest.raises(ValueError, match="pip install onnxruntime"):
        count_cells(img, counter=counter, diameter=13.0, engine="onnxruntime")
    monkeypatch.undo()
    monkeypatch.setenv("CELLSYNTH_ONNX_CACHE", "")  # memory only

    def broken(*a, **k):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(engines, "_export", broken)
    other = to_device(Counter(kind="density", name="other", config=dict(counter.config), net=build_net(counter.config)),
                      "cpu")
    res = count_cells(img, counter=other, diameter=13.0)
    assert res.meta["engine"].startswith("torch (onnxruntime could not")
    assert res.count == count_cells(img, counter=other, diameter=13.0, engine="torch").count


_CHILD = """
import json, sys
import numpy as np
from cellsynth.count import count_cells, load_counter
counter = load_counter(sys.argv[2], device=sys.argv[3])
res = count_cells(np.load(sys.argv[1]), counter=counter, diameter=13.0, tile=128)
print(json.dumps({"engine": res.meta["engine"], "built": counter.network_built, "torch": "torch" in sys.modules,
                  "timm": "timm" in sys.modules, "points": res.points.tolist()}))
"""


def _accelerator_driver() -> bool:
    from cellsynth.device import nvidia_driver_present

    return nvidia_driver_present() or os.path.exists("/dev/kfd") or sys.platform == "darwin"


def test_a_cached_export_counts_in_a_fresh_process_without_torch(image, tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setenv("CELLSYNTH_ONNX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CELLSYNTH_ENGINE", raising=False)
    img, _ = image
    counter = _tiny(tmp_path)  # nothing cached yet: built as usual
    assert counter.network_built
    ref = count_cells(img, counter=counter, diameter=13.0, tile=128, engine="torch")
    ort = count_cells(img, counter=counter, diameter=13.0, tile=128)  # exports into the cache
    np.save(tmp_path / "img.npy", img)
    for device in ["cpu"] + ([] if _accelerator_driver() else ["auto"]):
        run = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "img.npy"), str(counter.path), device],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        doc = json.loads(run.stdout.splitlines()[-1])
        assert doc["engine"] == "onnxruntime" and not doc["built"], doc["engine"]
        assert not doc["torch"] and not doc["timm"]
        got = np.array(doc["points"]).reshape(-1, 2)
        np.testing.assert_array_equal(got, ort.points)  # the same export: the same points
        np.testing.assert_allclose(got, ref.points, atol=1e-3)
        assert len(got) == ref.count


def test_a_damaged_foreign_or_stale_cached_export_is_not_used(image, tmp_path, monkeypatch, one_torch_thread):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CELLSYNTH_ONNX_CACHE", str(cache))
    monkeypatch.delenv("CELLSYNTH_ENGINE", raising=False)
    img, _ = image
    counter = _tiny(tmp_path)
    first = count_cells(img, counter=counter, diameter=13.0)
    (export,) = cache.glob("*.onnx")
    waiting = load_counter(counter.path, device="cpu")
    assert not waiting.network_built and waiting.stride == counter.net.stride
    res = count_cells(img, counter=waiting, diameter=13.0)
    assert not waiting.network_built and np.array_equal(res.points, first.points)
    assert res.meta["device"] == "cpu" and res.meta["sha256"] == counter.sha256

    # damaged (truncated): loaded as usual, counted the same, and the export made anew
    export.write_bytes(export.read_bytes()[:400])
    damaged = load_counter(counter.path, device="cpu")
    assert damaged.network_built
    assert np.array_equal(count_cells(img, counter=damaged, diameter=13.0).points, first.points)
    assert export.stat().st_size > 1000 and not load_counter(counter.path, device="cpu").network_built

    # another counter's export under this counter's name: its key (in the ONNX metadata) differs, so it is not run
    torch.manual_seed(1)
    other = load_counter(save_counter(build_net(counter.config), counter.config, tmp_path / "other"), device="cpu")
    count_cells(img, counter=other, diameter=13.0)
    foreign = next(p for p in cache.glob("*.onnx") if p != export)
    good = export.read_bytes()
    export.write_bytes(foreign.read_bytes())
    swapped = load_counter(counter.path, device="cpu")
    assert swapped.network_built
    assert np.array_equal(count_cells(img, counter=swapped, diameter=13.0).points, first.points)
    assert export.read_bytes() != foreign.read_bytes()

    # other torch/timm/onnxruntime releases or network code: another key, so the old export is not looked up
    export.write_bytes(good)
    with monkeypatch.context() as m:
        m.setattr(engines, "_versions", lambda: "other releases")
        assert load_counter(counter.path, device="cpu").network_built

    # the weights file replaced after a counter was loaded from the export: its network is not built from the new file
    waiting = load_counter(counter.path, device="cpu")
    assert not waiting.network_built
    torch.manual_seed(2)
    save_counter(build_net(counter.config), counter.config, counter.path, overwrite=True)
    with pytest.raises(ValueError, match="changed since the counter was loaded"):
        _ = waiting.net
    assert load_counter(counter.path, device="cpu").network_built  # new weights, not exported yet

    # asking for the network, or for PyTorch, builds it from the file: the same counts
    lazy = load_counter(tmp_path / "other", device="cpu")
    assert not lazy.network_built
    by_torch = count_cells(img, counter=lazy, diameter=13.0, engine="torch")
    assert lazy.network_built and by_torch.meta["engine"] == "torch"
    np.testing.assert_allclose(by_torch.points, count_cells(img, counter=other, diameter=13.0).points, atol=1e-3)
    assert all(not t.is_inference() for t in lazy.net.parameters())  # trainable, though built while counting
