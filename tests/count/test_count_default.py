"""The shipped default counter: size, provenance, accuracy on held-out generated layouts, seams."""

import numpy as np
import pytest

from cellsynth.count import count_cells, load_counter
from cellsynth.layouts import LayoutParams, generate_layout
from cellsynth.weights import resources_dir

MODEL_DIR = resources_dir() / "models" / "counter-default"
pytestmark = pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").is_file(), reason="default counter not built")


@pytest.fixture(scope="module")
def default():
    return load_counter("default", device="cpu")


def _held_out_layouts(n, seed=2024):
    """Syn-HC layouts with new seeds and randomised appearance and geometry."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = LayoutParams(
            shape=(256, 256),
            cell_size=float(rng.uniform(11, 20)),
            count_mean=float(rng.uniform(30, 200)),
            count_std=10.0,
            max_overlap=float(rng.uniform(0.0, 0.2)),
            intensity=(float(rng.uniform(80, 150)), 255.0),
            background=(float(rng.uniform(0, 20)), 30.0),
            noise_std=float(rng.uniform(2, 10)),
            blur_sigma=float(rng.uniform(0, 1.5)),
        )
        out.append(generate_layout(p, rng=[seed, i]))
    return out


def test_default_model_is_small_documented_and_fp16(default):
    files = {p.name: p.stat().st_size for p in MODEL_DIR.iterdir()}
    assert {"model.safetensors", "config.json", "README.md"} <= set(files)
    assert files["model.safetensors"] < 5e6
    cfg = default.config
    assert default.kind == "density" and cfg["dtype"] == "float16" and default.diameter == 15.0
    assert "train_default" in cfg["training"]["command"] and len(default.sha256) == 64
    from cellsynth.count.objects import ObjectParams

    # points reconciled with foreground objects; keep_outside comes from the calibration (test below)
    assert ObjectParams(**{**cfg["objects"], "keep_outside": ObjectParams().keep_outside}) == ObjectParams()


def test_default_counts_held_out_layouts_within_5_percent(default):
    layouts = _held_out_layouts(12)
    rel, recall, precision = [], [], []
    for lay in layouts:
        res = count_cells(lay.image, counter=default)
        rel.append(abs(res.count - lay.n_cells) / lay.n_cells)
        d = np.linalg.norm(res.points[:, None] - lay.centres[None], axis=2) if len(res.points) else np.zeros((0, 1))
        recall.append(np.mean(d.min(axis=0) <= 3) if len(res.points) else 0.0)
        precision.append(np.mean(d.min(axis=1) <= 3) if len(res.points) else 1.0)
    assert np.mean(rel) < 0.05, rel
    assert np.mean(recall) > 0.9 and np.mean(precision) > 0.9


def test_default_cells_on_tile_seams_are_counted_once(default):
    from skimage.draw import ellipse

    from cellsynth.count.infer import tile_layout

    tile, overlap, size = 128, 16, 300
    side, starts = tile_layout(size + 2 * overlap, tile, overlap)
    # first and last rows (and columns) of every tile, in image coordinates
    seams = sorted({s - overlap for s in starts[1:]} | {s - overlap + side - 1 for s in starts[:-1]})
    seams = [s for s in seams if 8 <= s < size - 8]
    rows = [seams[0]] + [s for a, s in zip(seams, seams[1:]) if s - a >= 14]
    rng = np.random.default_rng(0)
    img = rng.normal(20, 4, (size, size))
    centres = [(r, c) for r in rows for c in range(10, size - 8, 18)]
    for r, c in centres:
        rr, cc = ellipse(r, c, 5.5, 5.5, shape=img.shape)
        img[rr, cc] = 200 + rng.normal(0, 4, len(rr))
    assert len(centres) >= 40
    tiled = count_cells(img, counter=default, tile=tile, overlap=overlap)
    assert len(tiled.points) == len(centres)
    d = np.linalg.norm(tiled.points[:, None] - np.array(centres, float)[None], axis=2)
    assert np.all(d.min(axis=0) <= 2) and np.all(d.min(axis=1) <= 2)  # each seam cell once, in place
    # the same cells moved into tile interiors (half a tile step down) give the same count
    off_seams = count_cells(np.roll(img, (tile - overlap) // 2, axis=0), counter=default, tile=tile, overlap=overlap)
    assert len(off_seams.points) == len(centres)
    assert abs(tiled.count - off_seams.count) < 0.015 * len(centres)
    assert abs(tiled.count - len(centres)) < 0.1 * len(centres)


def test_default_counts_an_empty_image_as_nearly_zero(default):
    img = np.random.default_rng(1).normal(100, 5, (200, 300)).clip(0).astype(np.uint16)
    res = count_cells(img, counter=default)
    assert res.count < 3 and len(res.points) <= 2


def test_calibration_picks_the_lowest_error_and_restores_the_config(default):
    from cellsynth.tools.calibrate import calibrate_keep_outside, synthetic_cases

    cases = list(synthetic_cases(2, seed=5))
    before = dict(default.config["objects"])
    res = calibrate_keep_outside(default, cases, grid=(0.0, 0.5, 5.0))
    assert default.config["objects"] == before
    assert set(res["errors"]) == {0.0, 0.5, 5.0} and res["n_images"] == 2
    assert res["best"] == min(res["errors"], key=lambda v: (res["errors"][v], v))
    # a threshold above every score drops every peak outside the objects: a different count
    assert res["errors"][5.0] != res["errors"][0.0]


def test_shipped_keep_outside_is_the_recorded_calibration(default):
    cal = default.config.get("calibration")
    assert cal is not None, "the default counter's peak filtering must come from cellsynth.tools.calibrate"
    assert cal["parameter"] == "objects.keep_outside"
    assert default.config["objects"]["keep_outside"] == cal["chosen"]
    errors = cal["mean_rel_error"]
    assert float(min(errors, key=lambda k: (errors[k], float(k)))) == cal["chosen"]


def test_calibrate_cli_refuses_a_folder_without_a_counter(tmp_path, capsys):
    from cellsynth.tools.calibrate import main

    assert main([str(tmp_path), "--n", "1"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
