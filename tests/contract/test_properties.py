"""Property-based tests: the layout generator and the counters on random small inputs.

Whatever hypothesis draws, the outcome is a correct result (with the invariants below) or a
``ValueError``/``TypeError`` naming the problem: never another exception, a NaN, or a point
outside the image.
"""

from __future__ import annotations

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra.numpy import arrays  # noqa: E402

from cellsynth.layouts import LayoutParams, generate_layout  # noqa: E402

FAST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def layout_params(draw):
    rows, cols = draw(st.integers(8, 80)), draw(st.integers(8, 80))
    low = draw(st.integers(1, 4))
    return LayoutParams(
        shape=(rows, cols),
        count_mean=draw(st.floats(0, 40)),
        count_std=draw(st.floats(0, 20)),
        count_min=0,
        count_max=draw(st.integers(0, 60)),
        clusters=(low, low + draw(st.integers(0, 3))),
        cell_size=draw(st.floats(2.0, min(20.0, 2 * max(rows, cols)))),
        max_overlap=draw(st.floats(0, 0.5)),
        max_tries=draw(st.integers(1, 10)),
        noise_std=draw(st.floats(0, 20)),
        blur_sigma=draw(st.floats(0, 2)),
        rotation=draw(st.booleans()),
    )


@FAST
@given(params=layout_params(), seed=st.integers(0, 2**32 - 1))
def test_layouts_are_consistent_and_reproducible(params, seed):
    lay = generate_layout(params, rng=seed)
    rows, cols = params.shape
    assert lay.image.shape == lay.labels.shape == (rows, cols)
    assert lay.image.dtype == np.uint8
    n = lay.n_cells
    assert lay.centres.shape == (n, 2) and n <= params.count_max
    assert np.all(np.isfinite(lay.centres))
    assert np.all((lay.centres >= 0) & (lay.centres <= [rows, cols]))
    assert all(len(v) == n for v in lay.cells.values())
    present = set(np.unique(lay.labels)) - {0}
    assert present <= set(int(v) for v in lay.cells["label"])
    assert len(present) >= (1 if n else 0)  # every placed cell keeps most of its area, so some label shows
    again = generate_layout(params, rng=seed)
    assert np.array_equal(again.image, lay.image) and np.array_equal(again.labels, lay.labels)


DTYPES = st.sampled_from([np.uint8, np.uint16, np.int16, np.float32, np.float64])


@st.composite
def small_images(draw):
    dtype = draw(DTYPES)
    shape = (draw(st.integers(2, 48)), draw(st.integers(2, 48)))
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        elements = st.integers(max(info.min, -1000), min(info.max, 4000))
    else:
        elements = st.floats(-1e3, 1e4, allow_nan=False, allow_infinity=False, width=32)
    return draw(arrays(dtype, shape, elements=elements))


@FAST
@given(image=small_images(), diameter=st.floats(1.0, 30.0))
def test_the_classic_counter_on_random_images(image, diameter):
    from cellsynth.count import count_cells

    try:
        res = count_cells(image, model="classic", diameter=diameter)
    except ValueError:
        return  # e.g. a diameter that does not fit the image: refused with a message
    rows, cols = image.shape
    assert res.count == len(res.points) == len(res.scores)
    assert np.all(np.isfinite(res.points)) and np.all(np.isfinite(res.scores))
    if len(res.points):
        assert np.all((res.points >= -0.5) & (res.points <= [rows - 0.5, cols - 0.5]))
    again = count_cells(image, model="classic", diameter=diameter)
    assert again.count == res.count and np.array_equal(again.points, res.points)


@FAST
@given(image=small_images())
def test_a_constant_image_has_no_cells_and_the_estimate_is_positive_or_refused(image):
    from cellsynth.count import count_cells, estimate_diameter

    flat = np.full_like(image, image.flat[0])
    assert count_cells(flat, model="classic", diameter=8.0).count == 0
    try:
        d = estimate_diameter(image)
    except ValueError:
        return
    assert np.isfinite(d) and d > 0


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(image=small_images(), diameter=st.sampled_from(["auto", 6.0, 15.0]))
def test_the_default_counter_on_random_images(image, diameter):
    import torch

    from cellsynth.count import count_cells

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = count_cells(image, model="default", diameter=diameter)
    except ValueError:
        return
    finally:
        torch.set_num_threads(threads)
    rows, cols = image.shape
    assert res.count == len(res.points)
    assert np.all(np.isfinite(res.points)) and np.all(np.isfinite(res.scores))
    if len(res.points):
        assert np.all((res.points >= -0.5) & (res.points <= [rows - 0.5, cols - 0.5]))
    assert res.density is not None and res.density.shape == image.shape
    assert np.all(np.isfinite(res.density)) and res.density.min() >= -1e-3
