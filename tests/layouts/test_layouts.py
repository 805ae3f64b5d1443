import numpy as np
import pytest

from cellsynth.layouts import LayoutParams, generate_layout, render_layout
from cellsynth.layouts.generate import ellipse_mask

SMALL = LayoutParams(shape=(96, 128), count_mean=40, count_std=10)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_counts_labels_and_table_agree(seed):
    lay = generate_layout(SMALL, rng=seed)
    ids = np.unique(lay.labels)
    ids = ids[ids > 0]
    assert lay.n_cells > 0
    # every placed cell keeps at least its centre pixel, so the label count equals the true count
    assert ids.tolist() == list(range(1, lay.n_cells + 1))
    assert len(lay.cells["row"]) == lay.centres.shape[0] == lay.n_cells
    np.testing.assert_array_equal(lay.cells["label"], np.arange(1, lay.n_cells + 1))


@pytest.mark.parametrize("seed", [0, 5])
def test_centres_lie_inside_their_own_cells(seed):
    lay = generate_layout(SMALL, rng=seed)
    r = lay.centres[:, 0].astype(int)
    c = lay.centres[:, 1].astype(int)
    np.testing.assert_array_equal(lay.labels[r, c], lay.cells["label"])


@pytest.mark.parametrize("max_overlap", [0.0, 0.1, 0.3])
def test_overlap_fraction_measured_from_labels(max_overlap):
    params = LayoutParams(shape=(128, 128), count_mean=150, count_std=0, cluster_spread=0.08,
                          max_overlap=max_overlap)
    lay = generate_layout(params, rng=11)
    rows, cols = params.shape
    worst = 0.0
    for k in range(lay.n_cells):
        r, c = lay.cells["row"][k], lay.cells["col"][k]
        m = ellipse_mask(lay.cells["radius_row"][k], lay.cells["radius_col"][k], lay.cells["angle"][k],
                         r - int(r), c - int(c))
        h = m.shape[0] // 2
        rr, cc = np.nonzero(m)
        rr, cc = rr + int(r) - h, cc + int(c) - h
        ok = (rr >= 0) & (rr < rows) & (cc >= 0) & (cc < cols)
        own = lay.labels[rr[ok], cc[ok]]
        # pixels of this ellipse that belong to an earlier cell
        frac = np.count_nonzero((own > 0) & (own < k + 1)) / ok.sum()
        worst = max(worst, frac)
        # first cell wins: the rest of the ellipse is this cell's own, no later cell took any of it
        assert np.count_nonzero(own == k + 1) == ok.sum() - np.count_nonzero((own > 0) & (own < k + 1))
    assert worst <= max_overlap + 1e-9
    if max_overlap > 0:
        assert worst > 0  # clustered cells do touch, so the rule is really exercised


def test_overlap_rule_drops_cells_when_crowded():
    crowded = LayoutParams(shape=(64, 64), count_mean=400, count_std=0, max_overlap=0.0)
    lay = generate_layout(crowded, rng=0)
    assert 0 < lay.n_cells < 400  # the true count reflects what was placed


def test_same_seed_same_layout_other_seed_differs():
    a, b, c = (generate_layout(SMALL, rng=s) for s in (7, 7, 8))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.image, c.image)
    gen = np.random.default_rng(7)
    np.testing.assert_array_equal(generate_layout(SMALL, rng=gen).image, a.image)


def test_dtypes_and_ranges():
    lay = generate_layout(SMALL, rng=0)
    assert lay.image.dtype == np.uint8 and lay.labels.dtype == np.uint16
    assert lay.image.shape == lay.labels.shape == SMALL.shape
    cells = lay.labels > 0
    # cells are brighter than background on average (intensity 150-255 vs background 10-30)
    assert lay.image[cells].mean() > lay.image[~cells].mean() + 80
    assert np.all((lay.cells["intensity"] >= 150) & (lay.cells["intensity"] <= 255))
    radii = np.concatenate([lay.cells["radius_row"], lay.cells["radius_col"]])
    assert radii.min() >= 7.5 * 0.8 - 1e-9 and radii.max() <= 7.5 * 1.2 + 1e-9


def test_cluster_count_and_spread_shape_the_layout():
    # 30 cells fit in the tight cluster (more would spill into the nearest free room around it)
    tight = LayoutParams(shape=(256, 256), count_mean=30, count_std=0, clusters=(1, 1), cluster_spread=0.05,
                         max_overlap=0.5)
    lay = generate_layout(tight, rng=3)
    spread = lay.centres.std(axis=0).mean()
    loose = generate_layout(LayoutParams(shape=(256, 256), count_mean=30, count_std=0, clusters=(1, 1),
                                         cluster_spread=0.3), rng=3)
    assert spread < 0.1 * 256 < loose.centres.std(axis=0).mean()


def test_noise_and_contrast_parameters_are_used():
    flat = LayoutParams(shape=(64, 64), count_mean=0, count_std=0, count_min=0, noise_std=0, contrast=(1, 1),
                        brightness=(0, 0), background=(20, 20))
    lay = generate_layout(flat, rng=0)
    assert lay.n_cells == 0 and np.all(lay.image == 20)
    noisy = generate_layout(LayoutParams(**{**flat.to_dict(), "shape": (64, 64), "noise_std": 5.0,
                                            "clusters": (3, 7)}), rng=0)
    assert 4.0 < noisy.image.astype(float).std() < 6.0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"max_overlap": 1.5}, "max_overlap"),
        ({"cell_size": 0}, "cell_size"),
        ({"clusters": (7, 3)}, "clusters"),
        ({"count_min": 50, "count_max": 10}, "count_min"),
        ({"shape": (4, 4)}, "shape"),
        ({"intensity": (1, 2, 3)}, "intensity"),
        ({"max_tries": 2.5}, "max_tries"),
        ({"noise_std": float("nan")}, "noise_std"),
    ],
)
def test_bad_parameters_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LayoutParams(**kwargs)


def test_params_round_trip_through_dict():
    p = LayoutParams(shape=(100, 120), clusters=(2, 4))
    assert LayoutParams.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="unknown layout parameters"):
        LayoutParams.from_dict({"bogus": 1})


def test_render_layout_draws_given_cells_with_the_generator_appearance():
    p = LayoutParams(shape=(64, 64))
    cells = {"row": [10.0, 40.0, 100.0], "col": [10.0, 40.0, 5.0], "radius_row": [4.0, 6.0, 3.0],
             "radius_col": [4.0, 3.0, 3.0], "angle": [0.0, 0.5, 0.0], "intensity": [200.0, 250.0, 220.0]}
    lay = render_layout(cells, params=p, rng=0)
    assert lay.n_cells == 2  # the centre outside the image is left out
    assert lay.labels[10, 10] == 1 and lay.labels[40, 40] == 2
    area1 = np.count_nonzero(lay.labels == 1)
    assert abs(area1 - np.pi * 16) < 8
    again = render_layout(cells, params=p, rng=0)
    np.testing.assert_array_equal(lay.image, again.image)
    with pytest.raises(ValueError, match="row"):
        render_layout({"col": [1]}, params=p)
    with pytest.raises(ValueError, match="non-finite"):
        render_layout({"row": [1.0], "col": [np.nan]}, params=p)


def test_paper_statistics_hold_on_a_sample():
    # 120 default 256x256 layouts: Table 1 says 101.32 +- 76.43 (the benchmark checks 500)
    counts = np.array([generate_layout(rng=1000 + i).n_cells for i in range(120)])
    assert abs(counts.mean() - 101.32) < 0.15 * 101.32
    assert abs(counts.std() - 76.43) < 0.2 * 76.43
    assert counts.max() <= 600


def test_a_cell_larger_than_the_image_is_refused_not_allocated():
    from cellsynth.layouts import LayoutParams

    with pytest.raises(ValueError, match="cell_size .* must not exceed twice the image's longer side"):
        LayoutParams(shape=(64, 64), cell_size=1e6)
    assert LayoutParams(shape=(64, 64), cell_size=128).cell_size == 128


def test_requested_counts_do_not_pile_up_at_a_bound():
    from cellsynth.layouts.generate import requested_count

    p = LayoutParams()
    counts = np.array([requested_count(p, np.random.default_rng(s)) for s in range(2000)])
    assert counts.min() >= p.count_min and counts.max() <= p.count_max
    at_min = np.mean(counts == p.count_min)
    near_min = np.mean((counts > p.count_min) & (counts <= p.count_min + 5)) / 5  # per count, just above
    assert at_min < 2 * near_min + 0.005  # a clamp put 23 % of layouts at exactly 10
    assert abs(counts.mean() - 107) < 10 and abs(counts.std() - 95) < 12  # before the image caps it
    assert requested_count(LayoutParams(count_mean=37, count_std=0), np.random.default_rng(0)) == 37


@pytest.mark.parametrize("seed", [0, 1])
def test_crowded_clusters_still_place_what_was_asked(seed):
    # 200 cells of 15 px on 256x256 fit; drawn only around 3-7 cluster centres, 150-185 were placed
    lay = generate_layout(LayoutParams(count_mean=200, count_std=0), rng=seed)
    assert lay.n_cells == 200
    labels = lay.labels
    areas = np.bincount(labels.ravel())[1:]
    assert (areas > 0).all() and len(areas) == 200


def test_a_full_image_stops_placing_without_exceeding_the_overlap_rule():
    lay = generate_layout(LayoutParams(count_mean=600, count_std=0), rng=0)
    assert 250 < lay.n_cells < 600  # the old generator saturated near 250; 600 do not fit at <= 10 % overlap
    fg = np.count_nonzero(lay.labels) / lay.labels.size
    assert fg > 0.6  # the image is really full
