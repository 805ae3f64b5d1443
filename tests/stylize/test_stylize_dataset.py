"""Batch stylization of a layout dataset with count QC, resumable."""

import numpy as np
import pytest
import torch

from cellsynth import io
from cellsynth.layouts import LayoutParams, export_dataset, read_dataset
from cellsynth.progress import Cancelled
from cellsynth.stylize import StylizeParams, stylize_dataset
from cellsynth.stylize.tiny import tiny_pipeline, tiny_token


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("layouts")
    export_dataset(root, 3, params=LayoutParams(shape=(40, 40), count_mean=6, count_std=0, count_min=2,
                                                count_max=10, cell_size=9.0), seed=1)
    style = (np.random.default_rng(0).normal(100, 30, (32, 32))).clip(0, 255).astype(np.uint8)
    return root, tiny_pipeline(0), tiny_token(0), style


def test_stylized_dataset_keeps_labels_and_records_qc(setup, tmp_path):
    src, pipe, token, style = setup
    params = StylizeParams(num_inference_steps=4, size=32, strength=0.5)
    manifest = stylize_dataset(src, tmp_path / "out", pipe=pipe, token=token, style=style, params=params,
                               tolerance=10.0, qc_model="classic")
    out, inp = read_dataset(manifest), read_dataset(src)
    assert len(out) == 3 and out.manifest["complete"]
    assert out.counts().tolist() == inp.counts().tolist()
    for i in range(3):
        image, centres, labels = out.load(i)
        image0, centres0, labels0 = inp.load(i)
        assert image.shape == image0.shape and image.dtype == np.uint8 and not np.array_equal(image, image0)
        assert np.array_equal(labels, labels0) and np.allclose(centres, centres0)
        qc = out.items[i]["qc"]
        assert qc["counter"] == "count:classic"
        assert qc["drift"] == pytest.approx((qc["count"] - out.items[i]["n_cells"]) / out.items[i]["n_cells"])
        assert qc["keep"] is True  # tolerance 10: everything kept
    assert out.manifest["qc"]["kept"] == 3 and out.manifest["stylize"]["params"]["strength"] == 0.5
    # the same settings again: nothing to do, nothing rewritten
    mtime = (tmp_path / "out" / out.items[0]["image"]).stat().st_mtime_ns
    stylize_dataset(src, tmp_path / "out", pipe=pipe, token=token, style=style, params=params, tolerance=10.0,
                    qc_model="classic")
    assert (tmp_path / "out" / out.items[0]["image"]).stat().st_mtime_ns == mtime
    # other settings are refused unless overwrite
    with pytest.raises(FileExistsError, match="other settings"):
        stylize_dataset(src, tmp_path / "out", pipe=pipe, token=token, style=style, params=params, tolerance=0.0,
                        qc_model="classic")
    strict = stylize_dataset(src, tmp_path / "out", pipe=pipe, token=token, style=style, params=params,
                             tolerance=0.0, qc_model="classic", overwrite=True)
    kept = [it["qc"]["keep"] for it in read_dataset(strict).items]
    assert kept == [it["qc"]["drift"] == 0 for it in read_dataset(strict).items]


def test_cancelled_run_resumes_where_it_stopped(setup, tmp_path):
    src, pipe, token, style = setup
    params = StylizeParams(num_inference_steps=2, size=32)

    def stop_after_two(p):
        if p.step == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        stylize_dataset(src, tmp_path / "o", pipe=pipe, token=token, style=style, params=params, progress=stop_after_two,
                        qc_model="classic")
    doc = io.read_json(tmp_path / "o" / "manifest.json")
    assert len(doc["items"]) == 2 and not doc["complete"]
    first = io.read_tiff(tmp_path / "o" / doc["items"][0]["image"])[0]
    events = []
    stylize_dataset(src, tmp_path / "o", pipe=pipe, token=token, style=style, params=params, progress=events.append,
                    qc_model="classic")
    assert [e.step for e in events] == [2, 3]
    doc = io.read_json(tmp_path / "o" / "manifest.json")
    assert doc["complete"] and len(doc["items"]) == 3
    assert np.array_equal(io.read_tiff(tmp_path / "o" / doc["items"][0]["image"])[0], first)
    seeds = [it["seed"] for it in doc["items"]]
    assert len(set(seeds)) == 3  # each item its own seed


def test_foreign_folder_is_refused(setup, tmp_path):
    src, pipe, token, style = setup
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        stylize_dataset(src, tmp_path, pipe=pipe, token=token, style=style)
    assert (tmp_path / "notes.txt").read_text() == "mine"
