"""Counting core without networks: inputs, targets, CutMix, peaks, tiling, classic counter."""

import subprocess
import sys

import numpy as np
import pytest
from skimage.draw import disk

from cellsynth.count import ClassicParams, count_cells, density_peaks, estimate_diameter, load_counter
from cellsynth.count.data import CountItem, centres_from_labels, load_count_data, sample_crop, split_items
from cellsynth.count.infer import tile_layout, tile_starts
from cellsynth.count.preprocess import normalize_image, split_planes
from cellsynth.count.targets import centre_map, count_in_box, cutmix, density_target
from cellsynth.layouts import LayoutParams, export_dataset, generate_layout


def test_importing_count_does_not_import_torch():
    code = "import sys, cellsynth.count, cellsynth.count._cli; assert 'torch' not in sys.modules, 'torch'; " \
           "assert 'timm' not in sys.modules, 'timm'; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


# ----------------------------------------------------------------------------- inputs

@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.int32, bool])
def test_normalize_maps_background_to_zero_and_cells_near_one(dtype):
    img = np.zeros((64, 64), dtype)
    val = True if dtype is bool else 200
    img[10:40, 10:40] = val
    out = normalize_image(img)
    assert out.dtype == np.float32
    assert out[0, 0] == 0 and out[20, 20] == pytest.approx(1.0)


def test_normalize_is_robust_to_a_hot_pixel_and_to_sparse_images():
    rng = np.random.default_rng(0)
    img = rng.normal(100, 3, (200, 200)).astype(np.float32)
    img[50:60, 50:60] += 400  # one small cell: 0.25 % of the pixels
    img[0, 0] = 1e6  # hot pixel
    out = normalize_image(img)
    cell, bg = out[52:58, 52:58].mean(), out[100:, 100:]
    assert cell > 10 * bg.std()  # the cell stands out of the noise
    assert out.max() <= 5.0 and out.min() >= -1.0


def test_normalize_rejects_nan_and_bad_percentiles():
    with pytest.raises(ValueError, match="NaN"):
        normalize_image(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="percentiles"):
        normalize_image(np.zeros((3, 3)), low=50, high=10)
    with pytest.raises(TypeError, match="real numbers"):
        normalize_image(np.array([["a", "b"]]))


def test_split_planes_stacks_channels_and_errors():
    planes, lead = split_planes(np.zeros((2, 3, 20, 30)))
    assert planes.shape == (6, 20, 30) and lead == (2, 3)
    rgb = np.zeros((20, 30, 3)); rgb[..., 2] = 1
    assert split_planes(rgb)[0].max() == 1 and split_planes(rgb, channel=0)[0].max() == 0
    cyx = np.zeros((3, 20, 30)); cyx[1] = 5
    assert split_planes(cyx, channel=1, channel_axis=0)[0].max() == 5
    with pytest.raises(ValueError, match="channel 5 does not exist"):
        split_planes(rgb, channel=5)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        split_planes(np.zeros(10))
    with pytest.raises(ValueError, match="no channel axis"):
        split_planes(np.zeros((20, 30)), channel=2)


# ----------------------------------------------------------------------------- targets

def test_density_target_mass_is_exact_also_at_borders():
    rng = np.random.default_rng(1)
    centres = rng.uniform(0, [40, 50], size=(30, 2))
    centres[:3] = [[0, 0], [39.9, 49.9], [0, 25]]  # corner and edge cells
    d = density_target(centres, (40, 50), sigma=2.5, scale=100.0)
    assert d.sum() == pytest.approx(3000.0, rel=1e-5)
    outside = density_target([[-1, 5], [5, 50]], (40, 50))
    assert outside.sum() == 0


def test_centre_map_and_box_use_the_same_pixel_rule():
    c = np.array([[0.99, 0.0], [1.0, 2.5], [3.2, 3.99]])
    m = centre_map(c, (4, 4))
    assert m.sum() == 3 and m[0, 0] == 1 and m[1, 2] == 1 and m[3, 3] == 1
    assert count_in_box(c, (1, 2, 4, 4)).tolist() == [False, True, True]


@pytest.mark.parametrize("seed", range(20))
def test_cutmix_count_equals_the_cut_applied_to_both_centre_maps(seed):
    rng = np.random.default_rng(seed)
    shape = (48, 64)
    ca, cb = rng.uniform(0, shape, (40, 2)), rng.uniform(0, shape, (25, 2))
    a, b = np.zeros(shape), np.ones(shape)
    img, cen, box = cutmix(a, ca, b, cb, alpha=0.7, p=1.0, rng=seed)
    mask = img.astype(bool)  # where b was pasted
    assert box is not None and mask.sum() == (box[2] - box[0]) * (box[3] - box[1])
    ma, mb = centre_map(ca, shape), centre_map(cb, shape)
    assert len(cen) == ma[~mask].sum() + mb[mask].sum()
    np.testing.assert_array_equal(centre_map(cen, shape), np.where(mask, mb, ma))


def test_cutmix_probability_zero_leaves_a_unchanged_and_checks_shapes():
    a = np.arange(12.0).reshape(3, 4)
    img, cen, box = cutmix(a, [[1, 1]], a * 0, [[2, 2]], p=0.0, rng=0)
    assert box is None and np.array_equal(img, a) and cen.tolist() == [[1, 1]]
    with pytest.raises(ValueError, match="same shape"):
        cutmix(a, [], np.zeros((4, 4)), [])
    with pytest.raises(ValueError, match="alpha"):
        cutmix(a, [], a, [], alpha=0)


def test_cutmix_beta_area_follows_alpha():
    areas = []
    for s in range(300):
        _, _, box = cutmix(np.zeros((100, 100)), [], np.ones((100, 100)), [], alpha=0.5, p=1.0, rng=s)
        areas.append((box[2] - box[0]) * (box[3] - box[1]) / 1e4)
    assert abs(np.mean(areas) - 0.5) < 0.07  # Beta(a, a) has mean 1/2
    assert np.mean(np.array(areas) < 0.1) > 0.15  # alpha < 1: U-shaped, many small boxes


# ----------------------------------------------------------------------------- peaks, tiles

def test_peaks_to_points_exact_on_a_synthetic_density():
    rng = np.random.default_rng(3)
    centres = np.array([[r, c] for r in range(8, 90, 14) for c in range(8, 120, 14)], float)
    centres += rng.integers(-2, 3, size=centres.shape)  # integer positions, 10+ px apart
    d = density_target(centres, (100, 128), sigma=2.5)
    pts, scores = density_peaks(d, min_distance=4, sigma=2.5)
    assert len(pts) == len(centres)
    dist = np.linalg.norm(pts[:, None] - centres[None], axis=2)
    assert sorted(dist.argmin(axis=1).tolist()) == list(range(len(centres)))  # one point per cell
    assert dist.min(axis=1).max() < 0.01  # at the centre (neighbours' tails shift it by < 0.01 px)
    assert np.all(scores > 0.95)
    # a blob with a fifth of a cell's mass is below the default threshold (0.3 of a lone peak)
    weak = density_peaks(0.2 * density_target([[20, 20]], (40, 40)), min_distance=4)[0]
    assert len(weak) == 0


def test_tile_layout_covers_with_overlap_and_fewer_pixels():
    for length in (64, 65, 200, 256, 600, 2100, 2112):
        for tile, ov in ((64, 16), (256, 32), (512, 32)):
            side, s = tile_layout(length, tile, ov)
            assert side % 16 == 0 and side <= max(tile, int(np.ceil(length / 16) * 16))
            assert s[0] == 0 and s[-1] + side >= length and (length <= tile or s[-1] + side == length)
            assert all(side - (b - a) >= ov for a, b in zip(s, s[1:]))
            # never more tiles, nor more pixels, than fixed-size tiles
            fixed = tile_starts(length, tile, ov)
            assert len(s) <= len(fixed) and len(s) * side <= max(len(fixed) * tile, side)


def test_tile_starts_cover_with_overlap():
    for length in (64, 65, 200, 256, 600, 2100):
        for tile, ov in ((64, 16), (256, 32)):
            s = tile_starts(length, tile, ov)
            assert s[0] == 0 and (length <= tile or s[-1] == length - tile)
            assert all(b - a <= tile - ov for a, b in zip(s, s[1:]))


# ----------------------------------------------------------------------------- classic

def _disks(shape, centres, radius, value=200):
    img = np.zeros(shape, np.uint8)
    for rc in centres:
        img[disk(rc, radius, shape=shape)] = value
    return img


def test_classic_counter_finds_separated_cells_and_works_on_stacks():
    centres = [(15, 15), (15, 45), (45, 30), (70, 70), (30, 80)]
    img = _disks((90, 100), centres, 6)
    rng = np.random.default_rng(0)
    noisy = np.clip(img + rng.normal(20, 4, img.shape), 0, 255).astype(np.uint8)
    res = count_cells(noisy, model="classic", diameter=12)
    assert res.count == 5 and res.density is None and res.meta["kind"] == "classic"
    got = sorted(map(tuple, np.round(res.points).astype(int).tolist()))
    assert all(min(abs(g[0] - c[0]) + abs(g[1] - c[1]) for g in got) <= 2 for c in centres)
    stack = np.stack([noisy, noisy[:, ::-1], np.zeros_like(noisy) + 20])
    seen = []
    res3 = count_cells(stack, model="classic", diameter=12, progress=seen.append)
    assert res3.points.shape == (10, 3) and res3.per_plane.tolist() == [5, 5, 0]
    assert set(res3.points[:, 0]) == {0.0, 1.0} and len(seen) == 3


def test_classic_counter_on_generated_layouts_is_close():
    # Syn-HC clusters touch and overlap (up to 10 %): a hard case for a watershed; 8 seeds keep the
    # mean out of seed noise (its quality on real images is measured by benchmarks/bench_count_real.py)
    errs = []
    for seed in range(8):
        lay = generate_layout(LayoutParams(shape=(160, 160), count_mean=40, count_std=10), rng=seed)
        res = count_cells(lay.image, model="classic", diameter=15)
        errs.append(abs(res.count - lay.n_cells) / lay.n_cells)
    assert np.mean(errs) < 0.25, errs


@pytest.mark.parametrize("d", [8.0, 14.0, 24.0])
def test_estimate_diameter_recovers_disk_size(d):
    rng = np.random.default_rng(int(d))
    centres = [(r, c) for r in range(int(d), 200 - int(d), int(2.2 * d)) for c in range(int(d), 200 - int(d), int(2.2 * d))]
    img = _disks((200, 200), centres, d / 2).astype(float) + rng.normal(10, 2, (200, 200))
    est = estimate_diameter(img)
    assert abs(est - d) / d < 0.25


@pytest.mark.parametrize("seed", [0, 1])
def test_estimate_diameter_large_nuclei_among_more_numerous_debris(seed):
    # 6 textured 64 px nuclei and 40 bright 7 px spots: by number the spots win, but they are not
    # the cells (the counters are trained to ignore such debris); the estimate must be the nuclei's
    from scipy.ndimage import gaussian_filter
    from skimage.draw import disk

    rng = np.random.default_rng(seed)
    img = np.zeros((512, 512), np.float32)
    for r, c in [(90, 90), (90, 260), (100, 420), (300, 120), (320, 300), (420, 430)]:
        rr, cc = disk((r + rng.integers(-8, 9), c + rng.integers(-8, 9)), 32, shape=img.shape)
        img[rr, cc] = rng.uniform(0.6, 1.0)
    img *= 1 + 0.3 * gaussian_filter(rng.standard_normal(img.shape).astype(np.float32), 3) / 0.1
    for r, c in rng.integers(5, 507, (40, 2)):
        rr, cc = disk((r, c), 3.5, shape=img.shape)
        img[rr, cc] = np.maximum(img[rr, cc], 1.5)
    img = gaussian_filter(img, 1.0) + rng.normal(0.05, 0.02, img.shape).astype(np.float32)
    est = estimate_diameter(img)
    assert abs(est - 64) / 64 < 0.15, est


def test_estimate_diameter_flat_image_is_a_clear_error():
    with pytest.raises(ValueError, match="no blob-like cells"):
        estimate_diameter(np.full((50, 50), 3.0))


def test_classic_params_validate():
    with pytest.raises(ValueError, match="diameter"):
        ClassicParams(diameter=-1)
    with pytest.raises(ValueError, match="min_distance"):
        ClassicParams(min_distance=0.5)


# ----------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize(
    "image, kwargs, exc, match",
    [
        (np.zeros(10), {}, ValueError, "at least 2 dimensions"),
        (np.zeros((0, 5)), {}, ValueError, "empty"),
        (np.zeros((2, 2, 2, 2, 2, 2)), {}, ValueError, "dimensions"),
        (np.array([["a"]]), {}, TypeError, "numeric"),
        (np.zeros((8, 8), complex), {}, TypeError, "real"),
        (np.zeros((32, 32)), {"diameter": -3}, ValueError, "diameter"),
        (np.zeros((32, 32)), {"diameter": "big"}, ValueError, "diameter"),
        (np.zeros((32, 32)), {"tile": 100}, ValueError, "tile"),
        (np.zeros((32, 32)), {"overlap": 200}, ValueError, "overlap"),
        (np.zeros((32, 32)), {"batch_size": 0}, ValueError, "batch_size"),
        (np.zeros((32, 32, 3)), {"channel": 3}, ValueError, "channel 3"),
        (np.zeros((32, 32)), {"model": "/no/such/model"}, FileNotFoundError, "no counter model"),
        (np.zeros((32, 32)), {"counter": "classic"}, TypeError, "Counter"),
    ],
)
def test_bad_inputs_give_clear_errors(image, kwargs, exc, match):
    kwargs.setdefault("model", "classic")
    with pytest.raises(exc, match=match):
        count_cells(image, **kwargs)


def test_load_counter_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no counter model"):
        load_counter(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_counter(tmp_path / "empty")
    with pytest.raises(TypeError, match="name, a path or a Counter"):
        load_counter(3.5)


# ----------------------------------------------------------------------------- data

def test_load_count_data_from_layout_dataset_folder_of_points_and_labels(tmp_path):
    from cellsynth import io

    export_dataset(tmp_path / "ds", 2, params=LayoutParams(shape=(48, 48), count_mean=8, count_std=1), seed=1)
    items = load_count_data(tmp_path / "ds")
    lay = generate_layout(LayoutParams(shape=(48, 48), count_mean=8, count_std=1), rng=None)
    assert len(items) == 2 and all(it.image.shape == (48, 48) for it in items)
    real = tmp_path / "real"
    io.write_tiff(real / "a.tif", lay.image)
    io.write_points_csv(real / "a.csv", lay.centres)
    io.write_tiff(real / "b.tif", lay.image)
    io.write_tiff(real / "b_labels.tif", lay.labels)
    io.write_tiff(real / "c.tif", lay.image)  # unlabelled
    got = load_count_data(real)
    assert [it.count for it in got] == [lay.n_cells, lay.n_cells]
    np.testing.assert_allclose(np.sort(got[1].centres[:, 0]), np.sort(centres_from_labels(lay.labels)[:, 0]))
    assert len(load_count_data(real, unlabelled=True)) == 3
    half = load_count_data(real, factor=0.5)
    assert half[0].image.shape == (24, 24)
    with pytest.raises(ValueError, match="no annotated images"):
        (tmp_path / "nothing").mkdir()
        load_count_data(tmp_path / "nothing")


def test_sample_crop_keeps_exactly_the_centres_inside():
    rng = np.random.default_rng(0)
    img = rng.random((80, 90)).astype(np.float32)
    centres = rng.uniform(0, (80, 90), (60, 2))
    item = CountItem(img, centres)
    for s in range(20):
        r = np.random.default_rng(s)
        crop, cen = sample_crop(item, 32, r, augment=False)
        r = np.random.default_rng(s)
        r0, c0 = int(r.integers(0, 49)), int(r.integers(0, 59))
        assert np.array_equal(crop, img[r0:r0 + 32, c0:c0 + 32])
        assert len(cen) == count_in_box(centres, (r0, c0, r0 + 32, c0 + 32)).sum()
        crop2, cen2 = sample_crop(item, 32, np.random.default_rng(s))
        assert len(cen2) == len(cen) and np.all((cen2 >= 0) & (cen2 < 32))


def test_split_items_validates():
    with pytest.raises(ValueError, match="fraction"):
        split_items([1, 2], 1.5)


def test_rgba_counts_the_colour_not_the_alpha(tmp_path):
    from skimage.draw import disk
    from skimage.io import imsave

    from cellsynth.cli import main

    rgba = np.zeros((80, 100, 4), np.uint8)
    rgba[..., 3] = 255  # opaque everywhere
    for c in (20, 50, 80):
        rgba[disk((40, c), 7)] = (0, 0, 220, 255)
    assert count_cells(rgba, model="classic", diameter=14).count == 3
    imsave(tmp_path / "rgba.png", rgba, check_contrast=False)
    assert main(["count", str(tmp_path / "rgba.png"), "--model", "classic", "--json", "--quiet"]) == 0


def test_imagej_channels_are_channels_and_channel_is_honoured(tmp_path, capsys):
    import json

    import tifffile
    from skimage.draw import disk

    from cellsynth.cli import main

    cyx = np.zeros((2, 90, 120), np.uint16)
    for k, c in enumerate(range(15, 120, 30)):
        cyx[0][disk((25, c), 6)] = 3000  # 4 nuclei in channel 0
    for c in (30, 90):
        cyx[1][disk((65, c), 6)] = 3000  # 2 spots in channel 1
    tifffile.imwrite(tmp_path / "cyx.tif", cyx, imagej=True, metadata={"axes": "CYX"})
    for channel, want in (("0", 4), ("1", 2)):
        assert main(["count", str(tmp_path / "cyx.tif"), "--model", "classic", "--diameter", "12",
                     "--channel", channel, "--json", "--quiet"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["count"] == want and len(doc["per_plane"]) == 1


def test_count_refuses_an_existing_output_before_counting(tmp_path, capsys, monkeypatch):
    import cellsynth.count
    from cellsynth import io
    from cellsynth.cli import main

    io.write_tiff(tmp_path / "img.tif", np.zeros((40, 40), np.uint8))
    (tmp_path / "pts.csv").write_text("keep me")
    monkeypatch.setattr(cellsynth.count, "count_cells", lambda *a, **k: pytest.fail("counted before checking --out"))
    assert main(["count", str(tmp_path / "img.tif"), "--model", "classic", "--out", str(tmp_path / "pts.csv")]) == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "pts.csv").read_text() == "keep me"


def test_classic_counter_on_a_long_thin_strip():
    from skimage.draw import disk

    strip = np.full((16, 4000), 10, np.uint16)
    for c in range(20, 4000, 40):
        strip[disk((8, c), 5, shape=strip.shape)] = 500
    res = count_cells(strip, model="classic")
    assert res.count == 100 and 8 <= res.meta["diameter_used"] <= 12


def test_empty_noise_image_counts_nothing_at_any_diameter():
    noise = np.random.default_rng(1).normal(100, 5, (200, 300)).clip(0).astype(np.uint16)
    with pytest.raises(ValueError, match="no blob-like cells"):
        estimate_diameter(noise)
    assert count_cells(noise, model="classic").count == 0
    assert count_cells(noise, model="classic", diameter=15).count == 0


def test_objects_reconcile_peaks_one_per_nucleus_sized_object():
    from skimage.draw import ellipse

    from cellsynth.count.objects import ObjectParams, reconcile_with_objects

    img = np.zeros((100, 160), np.float32)
    img[ellipse(25, 40, 5, 11)] = 1.0            # one elongated nucleus, two peaks on it
    img[disk((70, 40), 7)] = 1.0                 # two touching nuclei: one big object
    img[disk((70, 52), 7)] = 1.0
    img[disk((30, 120), 7)] = 1.0                # a nucleus the network missed
    img += np.random.default_rng(0).normal(0, 0.02, img.shape).astype(np.float32)
    peaks = np.array([[25, 34], [25, 46], [70, 40], [70, 52], [80, 130], [60, 140]], float)
    scores = np.array([0.9, 0.8, 1.0, 1.0, 0.9, 0.2])  # two peaks in the background: strong and weak
    density = np.zeros_like(img)
    density[30, 120] = 0.7
    pts, sc = reconcile_with_objects(img, peaks, scores, density, diameter=14, params=ObjectParams())
    got = sorted(map(tuple, np.round(pts).astype(int).tolist()))
    assert got == [(25, 40), (30, 120), (70, 40), (70, 52), (80, 130)]
    assert sc[np.argmin(np.abs(pts - [30, 120]).sum(axis=1))] == pytest.approx(0.7)  # its density mass
    # a stricter split area keeps the touching pair as one cell
    pts2, _ = reconcile_with_objects(img, peaks, scores, density, diameter=14, params=ObjectParams(split_area=3))
    assert len(pts2) == 4
    # an image of noise has no objects: only confident peaks stay
    noise = np.random.default_rng(1).normal(0, 1, (64, 64)).astype(np.float32)
    pts3, _ = reconcile_with_objects(noise, np.array([[10.0, 10.0], [40.0, 40.0]]), np.array([0.9, 0.1]),
                                     np.zeros_like(noise), diameter=10)
    assert pts3.tolist() == [[10.0, 10.0]]


def test_absurd_scales_are_refused_before_allocating(monkeypatch):
    import psutil

    img = np.zeros((64, 64), np.uint8)
    img[20:30, 20:30] = 200
    counter = load_counter("classic")
    with pytest.raises(ValueError, match="tile must be a multiple of 32 from 64 to 4096"):
        count_cells(img, counter=counter, tile=1048576)
    from cellsynth.count.models import counter_config, new_counter

    tiny = new_counter(counter_config("density", backbone="test_efficientnet", blocks=3), device="cpu")
    with pytest.raises(ValueError, match="needs about .* of memory .*--diameter"):
        count_cells(img, counter=tiny, diameter=1e-3)  # x15000: a 960000 px square plane
    small = psutil.virtual_memory()._replace(available=10_000)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: small)
    with pytest.raises(ValueError, match="needs about"):
        count_cells(img, counter=tiny, diameter=None)


def test_fast_local_maxima_equal_scikit_image_peaks_also_with_ties():
    from scipy.ndimage import gaussian_filter
    from skimage.feature import peak_local_max

    from cellsynth.count.peaks import _local_maxima

    rng = np.random.default_rng(0)
    n_ties = 0
    for i in range(60):
        d = gaussian_filter(rng.random((int(rng.integers(5, 90)), int(rng.integers(5, 90)))), rng.uniform(0.5, 3))
        if i % 2:
            d = np.round(d * rng.integers(3, 30)) / 10  # plateaus: equal neighbouring maxima
        d = d.astype(np.float32)
        md, thr = int(rng.integers(1, 6)), float(np.quantile(d, rng.uniform(0, 0.9)))
        want = peak_local_max(d, min_distance=md, threshold_abs=thr, exclude_border=False)
        got = _local_maxima(d, md, thr)
        assert sorted(map(tuple, got)) == sorted(map(tuple, want))
        n_ties += int(len(np.unique(d[tuple(want.T)])) < len(want)) if len(want) else 0
    assert n_ties > 5  # the tie-breaking path was exercised


def test_object_centroids_are_intensity_weighted_centres_of_mass():
    from scipy.ndimage import center_of_mass, gaussian_filter, label

    from cellsynth.count.objects import ObjectParams, reconcile_with_objects

    rng = np.random.default_rng(1)
    img = np.zeros((120, 160), np.float32)
    for r, c in rng.uniform(10, 110, (12, 2)):
        img[disk((r, c * 1.3), 5, shape=img.shape)] += rng.uniform(0.5, 1.0)
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    pts, _ = reconcile_with_objects(img, np.zeros((0, 2)), np.zeros(0), np.full(img.shape, 1e-3, np.float32),
                                    diameter=10.0, params=ObjectParams(min_area=0.0))
    sigma = max(0.5, ObjectParams().outline_sigma * 10.0)
    from cellsynth.count.classic import foreground_threshold
    smooth = gaussian_filter(img, sigma)
    labels, k = label(smooth > foreground_threshold(img, smooth, sigma=sigma))
    want = np.array(center_of_mass(np.clip(img, 0, None) + 1e-6, labels, np.arange(1, k + 1)))
    assert k >= 5 and len(pts) == k
    np.testing.assert_allclose(np.sort(pts, axis=0), np.sort(want, axis=0), atol=1e-6)


def test_points_csv_carries_each_nucleus_area(tmp_path, capsys):
    """``count --out`` gives each nucleus the area of its object (pixels, and µm² with a pixel size);
    touching nuclei share their object, a point outside every object has none."""
    import csv

    import tifffile

    from cellsynth.cli import main
    from cellsynth.count.objects import nucleus_areas

    img = np.full((120, 160), 20, np.uint16)
    radii = {(30, 30): 6, (30, 90): 9, (90, 40): 12}
    for c, r in radii.items():
        img[disk(c, r, shape=img.shape)] = 1000
    path = tmp_path / "sizes.tif"
    tifffile.imwrite(path, img, imagej=True, resolution=(1 / 0.5, 1 / 0.5), metadata={"unit": "um"})
    assert main(["count", str(path), "--model", "classic", "--diameter", "18", "--out", str(tmp_path / "p.csv"),
                 "--quiet"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 3
    for r in rows:
        true = np.pi * radii[min(radii, key=lambda c: np.hypot(c[0] - float(r["row"]), c[1] - float(r["col"])))] ** 2
        assert abs(float(r["area_px"]) / true - 1) < 0.15 and float(r["area_um2"]) == pytest.approx(
            0.25 * float(r["area_px"]), rel=1e-3)
    # stacks: each plane measured on its own; a point on the background has no area
    stack = np.stack([img, np.full_like(img, 20)])
    got = nucleus_areas(stack, np.array([[0, 90.0, 40.0], [1, 90.0, 40.0]]), diameter=18.0)
    assert abs(got[0] / (np.pi * 144) - 1) < 0.15 and np.isnan(got[1])
