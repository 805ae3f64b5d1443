"""Counter networks at tiny sizes: shapes, save/load, safe loading, tiling, seams, stacks."""

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from cellsynth.count import Counter, count_cells, counter_config, load_counter, save_counter
from cellsynth.count.infer import tile_layout
from cellsynth.count.models import new_counter
from cellsynth.count.preprocess import normalize_image
from cellsynth.progress import Cancelled

TINY = dict(backbone="test_efficientnet", blocks=3)


@pytest.fixture(scope="module")
def tiny_density():
    torch.manual_seed(0)
    return new_counter(counter_config("density", **TINY), device="cpu")


@pytest.fixture(scope="module")
def tiny_regression():
    torch.manual_seed(0)
    return new_counter(counter_config("regression", backbone="test_efficientnet", window=64), device="cpu")


def test_density_net_shape_nonnegative_and_truncated(tiny_density):
    net = tiny_density.net
    x = torch.randn(2, 1, 64, 96)
    with torch.inference_mode():
        y = net(x)
    assert y.shape == (2, 1, 64, 96) and torch.all(y >= 0) and torch.isfinite(y).all()
    assert net.stride == 8 and len(net.blocks) == 3  # only the first stages of the backbone


def test_regression_net_is_the_papers_linear_head(tiny_regression):
    head = tiny_regression.net.net.classifier
    assert isinstance(head, nn.Linear) and head.out_features == 1
    with torch.inference_mode():
        assert tiny_regression.net(torch.randn(3, 1, 64, 64)).shape == (3,)


def test_save_load_roundtrip_half_and_provenance(tmp_path, tiny_density):
    save_counter(tiny_density.net, tiny_density.config, tmp_path / "m", half=True)
    c = load_counter(tmp_path / "m", device="cpu")
    assert c.kind == "density" and c.config["dtype"] == "float16" and len(c.sha256) == 64
    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        a, b = tiny_density.net(x), c.net(x)
    assert torch.allclose(a, b, atol=2e-2 * float(a.abs().max()) + 1e-4)
    with pytest.raises(FileExistsError):
        save_counter(tiny_density.net, tiny_density.config, tmp_path / "m")
    img = np.random.default_rng(0).random((70, 50)).astype(np.float32)
    r1 = count_cells(img, diameter=None, counter=c)
    r2 = count_cells(img, diameter=None, model=str(tmp_path / "m"), device="cpu")
    assert r1.count == pytest.approx(r2.count) and r1.meta["sha256"] == c.sha256


def test_foreign_pt_state_dict_loads_as_regressor_and_pickles_are_refused(tmp_path, tiny_regression):
    state = {k.removeprefix("net."): v for k, v in tiny_regression.net.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "paper.pth")
    # no config beside it: read as the paper's EfficientNet-B0 regressor -> does not fit test_efficientnet
    with pytest.raises(ValueError, match="do not fit"):
        load_counter(tmp_path / "paper.pth", device="cpu")
    save_counter(tiny_regression.net, tiny_regression.config, tmp_path / "cfg")
    (tmp_path / "cfg" / "paper.pth").write_bytes((tmp_path / "paper.pth").read_bytes())
    c = load_counter(tmp_path / "cfg" / "paper.pth", device="cpu")
    assert c.kind == "regression"

    class Evil:
        def __reduce__(self):
            return (exec, ("open('%s', 'w').write('pwned')" % (tmp_path / "pwned"),))

    with open(tmp_path / "cfg" / "evil.pt", "wb") as fh:
        pickle.dump({"state_dict": Evil()}, fh)
    with pytest.raises(ValueError, match="never unpickled"):
        load_counter(tmp_path / "cfg" / "evil.pt", device="cpu")
    assert not (tmp_path / "pwned").exists()


def test_count_any_size_dtype_channel_and_stack(tiny_density):
    rng = np.random.default_rng(0)
    for shape in [(20, 33), (64, 64), (100, 150)]:
        for dtype in (np.uint8, np.uint16, np.float32):
            img = (rng.random(shape) * 200).astype(dtype)
            res = count_cells(img, diameter=None, counter=tiny_density, tile=64, overlap=8)
            assert res.density.shape == shape and np.isfinite(res.count)
            assert res.density_sum == pytest.approx(float(res.density.sum(dtype=np.float64)), rel=1e-5)
            assert res.count == len(res.points) and isinstance(res.count, int)
    rgb = (rng.random((40, 50, 3)) * 255).astype(np.uint8)
    res_c = count_cells(rgb, diameter=None, counter=tiny_density, channel=1, tile=64)
    res_g = count_cells(rgb[..., 1], diameter=None, counter=tiny_density, tile=64)
    assert res_c.count == pytest.approx(res_g.count)
    stack = (rng.random((3, 40, 50)) * 255).astype(np.uint8)
    res_s = count_cells(stack, diameter=None, counter=tiny_density, tile=64)
    assert res_s.density.shape == (3, 40, 50) and res_s.per_plane.shape == (3,)
    assert res_s.points.shape[1] == 3 and res_s.count == pytest.approx(res_s.per_plane.sum())
    for p in range(3):
        single = count_cells(stack[p], diameter=None, counter=tiny_density, tile=64)
        assert res_s.per_plane[p] == pytest.approx(single.count, rel=1e-5)
        assert np.sum(res_s.points[:, 0] == p) == len(single.points)
    res_t = count_cells(rng.random((2, 2, 40, 40)), diameter=None, counter=tiny_density, tile=64)
    assert res_t.points.shape[1] == 4 and res_t.per_plane.shape == (2, 2)


class _Pointwise(nn.Module):
    """A 'network' whose density is the image divided by a cell's area (linear, no context)."""

    stride = 8

    def __init__(self, area):
        super().__init__()
        self.area = area

    def forward(self, x):
        return torch.relu(x) / self.area


class _Blur(nn.Module):
    """A Gaussian blur with zero padding: tile edges lose mass unless blending is right."""

    stride = 8

    def __init__(self, area, sigma=1.5):
        super().__init__()
        k = torch.arange(-6, 7, dtype=torch.float32)
        g = torch.exp(-(k ** 2) / (2 * sigma ** 2))
        g = g[:, None] * g[None, :]
        self.register_buffer("k", (g / g.sum())[None, None])
        self.area = area

    def forward(self, x):
        return torch.relu(nn.functional.conv2d(x, self.k, padding=6)) / self.area


def _mock(net):
    cfg = counter_config("density", **TINY, density_scale=1.0)
    return Counter(kind="density", name="mock", config=cfg, net=net.eval(), device=torch.device("cpu"), dtype=torch.float32)


def _seam_positions(length, tile, overlap):
    """Image coordinates of the tile edges (where a tile's context ends)."""
    tile, starts = tile_layout(length + 2 * overlap, tile, overlap)
    edges = set()
    for s in starts[1:]:
        edges.add(s - overlap)  # first row of a tile
    for s in starts[:-1]:
        edges.add(s - overlap + tile - 1)  # last row of a tile
    return sorted(e for e in edges if 3 <= e < length - 3)


def test_cells_on_tile_seams_are_counted_once_not_twice_or_missed():
    from skimage.draw import disk

    tile, overlap, size = 64, 16, 150
    seams = _seam_positions(size, tile, overlap)
    assert len(seams) >= 4
    inner = max(range(10, size - 10), key=lambda c: min(abs(c - s) for s in seams))  # a column inside tiles
    centres = [(r, c) for r in seams for c in seams] + [(r, inner) for r in seams]
    img = np.zeros((size, size), np.float32)
    for rc in centres:
        img[disk(rc, 2.5, shape=img.shape)] = 1.0
    area = float(img.sum()) / len(set(centres))
    norm_sum = float(normalize_image(img).clip(0).sum())
    exact = count_cells(img, diameter=None, counter=_mock(_Pointwise(area)), tile=tile, overlap=overlap)
    assert exact.density_sum == pytest.approx(norm_sum / area, rel=1e-5)
    # a counter with context (blur, zero padding at tile edges) still counts every seam cell once
    blur = count_cells(img, diameter=None, counter=_mock(_Blur(area)), tile=tile, overlap=overlap)
    whole = count_cells(img, diameter=None, counter=_mock(_Blur(area)), tile=256)  # one tile, no seams
    assert blur.density_sum == pytest.approx(whole.density_sum, rel=0.01)
    assert len(blur.points) == len(set(centres))
    # without overlap and blending, a blur counter loses mass on seams: the test can fail
    windows = count_cells(img, diameter=None, counter=_mock(_Blur(area)), tile=tile, overlap=0)
    assert abs(windows.density_sum - whole.density_sum) > 3 * abs(blur.density_sum - whole.density_sum)


def test_batched_tiles_equal_one_by_one_and_progress_and_cancel(tiny_density):
    img = np.random.default_rng(1).random((130, 140)).astype(np.float32)
    seen = []
    a = count_cells(img, diameter=None, counter=tiny_density, tile=64, batch_size=8, progress=seen.append)
    b = count_cells(img, diameter=None, counter=tiny_density, tile=64, batch_size=1)
    assert a.density_sum == pytest.approx(b.density_sum, rel=1e-4) and a.count == b.count
    np.testing.assert_allclose(a.density, b.density, rtol=1e-4, atol=1e-6)
    assert seen[-1].step == seen[-1].total and all(p.stage == "tiles" for p in seen)

    def cancel(p):
        raise Cancelled()

    with pytest.raises(Cancelled):
        count_cells(img, diameter=None, counter=tiny_density, tile=64, progress=cancel)


def test_regression_counter_reports_windows_without_points(tiny_regression):
    img = np.random.default_rng(2).random((100, 150)).astype(np.float32)
    res = count_cells(img, diameter=None, counter=tiny_regression)
    assert res.points.shape == (0, 2) and res.density is None
    assert len(res.windows) == 2 * 3  # non-overlapping 64 px windows
    assert res.count == pytest.approx(sum(w[-1] for w in res.windows))
    assert {(w[0], w[1]) for w in res.windows} == {(r, c) for r in (0, 64) for c in (0, 64, 128)}
    assert res.windows[-1][2:4] == (36, 22) and "no cell positions" in res.meta["note"]


def test_diameter_rescales_and_maps_points_back(tiny_density):
    img = np.random.default_rng(3).random((90, 120)).astype(np.float32)
    res = count_cells(img, counter=tiny_density, diameter=30.0, tile=64)  # model scale 15 -> x0.5
    assert res.meta["scale_factor"] == pytest.approx(0.5)
    assert res.density.shape == (90, 120)
    assert res.density_sum == pytest.approx(float(res.density.sum(dtype=np.float64)), rel=1e-4)
    if len(res.points):
        assert res.points[:, 0].max() < 90 and res.points[:, 1].max() < 120


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runs_in_float16_and_matches_cpu(tiny_density):
    import copy

    from cellsynth.count.models import to_device

    net = copy.deepcopy(tiny_density.net).float()
    gpu = to_device(Counter(kind="density", name="t", config=tiny_density.config, net=net), "cuda")
    assert gpu.dtype == torch.float16
    img = np.random.default_rng(4).random((100, 120)).astype(np.float32)
    a = count_cells(img, diameter=None, counter=gpu, tile=64)
    cpu = to_device(gpu, "cpu")
    b = count_cells(img, diameter=None, counter=cpu, tile=64)
    assert a.density_sum == pytest.approx(b.density_sum, rel=2e-2)


def test_checkpoint_of_the_papers_public_code_loads_and_counts_like_it(tmp_path):
    # The paper's public code trains torchvision's efficientnet_b0 with classifier[1] = Linear(1280, 1)
    # on 8-bit images read as RGB and scaled by (x / 255 - 0.0414) / 0.0203.
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.efficientnet_b0(weights=None)
    ref.classifier[1] = nn.Linear(ref.classifier[1].in_features, 1)
    ref.eval()
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, tmp_path / "official.pth")
    c = load_counter(tmp_path / "official.pth", device="cpu")
    assert c.kind == "regression" and c.config["backbone"] == "torchvision:efficientnet_b0"
    img = (np.random.default_rng(0).random((256, 256)) * 255).astype(np.uint8)
    res = count_cells(img, counter=c, diameter=30.0)  # imported models are never rescaled
    x = (torch.from_numpy(img).float() / 255 - 0.0414) / 0.0203
    with torch.no_grad():
        expected = float(ref(x[None, None].expand(1, 3, -1, -1))[0, 0])
    assert res.meta["scale_factor"] == 1.0 and len(res.windows) == 1
    assert res.count == pytest.approx(expected, rel=1e-3, abs=1e-3)


def test_batchnorm_is_folded_for_inference_without_touching_the_trained_net(tiny_density):
    from cellsynth.count._nets import fold_batchnorm
    from cellsynth.count.infer import _inference_net  # the Counter method behind it

    net = tiny_density.net.float()
    with torch.no_grad():  # non-trivial running statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    fused = fold_batchnorm(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # the original keeps its layers
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), net.eval()(x), rtol=1e-4, atol=1e-5)
    first = _inference_net(tiny_density)
    assert _inference_net(tiny_density) is first  # made once
    with torch.no_grad():
        next(tiny_density.net.parameters()).add_(0.1)  # retrained in place: a fresh folded copy
    assert _inference_net(tiny_density) is not first
