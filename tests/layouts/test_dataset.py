import numpy as np
import pytest

from cellsynth import io
from cellsynth.layouts import LayoutParams, export_dataset, generate_layout, read_dataset
from cellsynth.progress import Cancelled

P = LayoutParams(shape=(48, 64), count_mean=12, count_std=4)


def test_export_writes_files_and_manifest(tmp_path):
    events = []
    manifest = export_dataset(tmp_path / "ds", 4, params=P, seed=3, progress=events.append)
    doc = io.read_json(manifest)
    assert doc["complete"] and doc["n"] == 4 and doc["params"] == P.to_dict() and doc["seed"] == 3
    assert [e.step for e in events] == [0, 1, 2, 3, 4] and all(e.total == 4 for e in events)
    ds = read_dataset(tmp_path / "ds")
    assert len(ds) == 4
    for i, item in enumerate(doc["items"]):
        assert set(item) >= {"image", "labels", "centres", "seed", "n_cells"}
        image, centres, labels = ds.load(i)
        assert image.dtype == np.uint8 and labels.dtype == np.uint16 and image.shape == P.shape
        assert len(centres) == item["n_cells"] == labels.max()
        # the recorded seed reproduces the item exactly
        again = generate_layout(P, rng=item["seed"])
        np.testing.assert_array_equal(again.image, image)
        np.testing.assert_allclose(again.centres, centres)
    _, feats = io.read_points_csv(tmp_path / "ds" / doc["items"][0]["centres"])
    assert {"label", "radius_row", "radius_col", "angle", "intensity"} <= set(feats)


def test_export_refuses_to_overwrite(tmp_path):
    export_dataset(tmp_path / "ds", 2, params=P, seed=0)
    before = (tmp_path / "ds" / "images" / "layout_0000.tif").read_bytes()
    with pytest.raises(FileExistsError, match="other parameters or seed"):
        export_dataset(tmp_path / "ds", 2, params=P, seed=1)
    assert (tmp_path / "ds" / "images" / "layout_0000.tif").read_bytes() == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_dataset(tmp_path / "other", 2, params=P)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    # explicit overwrite replaces the old dataset's files
    export_dataset(tmp_path / "ds", 1, params=P, seed=1, overwrite=True)
    doc = io.read_json(tmp_path / "ds" / "manifest.json")
    assert doc["seed"] == 1 and len(doc["items"]) == 1
    assert not (tmp_path / "ds" / "images" / "layout_0001.tif").exists()


def test_resume_after_cancel_gives_the_same_dataset(tmp_path):
    def cancel_after_two(p):
        if p.step >= 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        export_dataset(tmp_path / "a", 5, params=P, seed=9, progress=cancel_after_two)
    doc = io.read_json(tmp_path / "a" / "manifest.json")
    assert len(doc["items"]) == 2 and not doc["complete"]
    assert not list((tmp_path / "a").rglob("*.part"))  # no partial files
    assert len(list((tmp_path / "a" / "images").iterdir())) == 2
    steps = []
    export_dataset(tmp_path / "a", 5, params=P, seed=9, progress=lambda p: steps.append(p.step))
    assert steps == [2, 3, 4, 5]  # done items skipped
    export_dataset(tmp_path / "b", 5, params=P, seed=9)
    for sub in ("images", "labels", "centres"):
        for f in sorted((tmp_path / "b" / sub).iterdir()):
            assert (tmp_path / "a" / sub / f.name).read_bytes() == f.read_bytes()
    assert io.read_json(tmp_path / "a" / "manifest.json") == io.read_json(tmp_path / "b" / "manifest.json")


def test_bad_dataset_inputs(tmp_path):
    with pytest.raises(ValueError, match="positive integer"):
        export_dataset(tmp_path / "x", 0, params=P)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_dataset(tmp_path)
    io.write_json(tmp_path / "manifest.json", {"items": [{"image": "a.tif"}]})
    with pytest.raises(ValueError, match="centres"):
        read_dataset(tmp_path)
