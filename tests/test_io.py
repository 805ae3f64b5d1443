import numpy as np
import pytest

from cellsynth import io


def test_tiff_round_trip_keeps_data_and_pixel_size(tmp_path):
    data = (np.arange(12 * 10) % 251).astype(np.uint8).reshape(12, 10)
    path = io.write_tiff(tmp_path / "a.tif", data, pixel_size=0.65)
    back, meta = io.read_tiff(path)
    np.testing.assert_array_equal(back, data)
    assert meta["pixel_size"] == pytest.approx(0.65, rel=1e-6)
    labels = np.arange(6, dtype=np.uint16).reshape(2, 3) * 1000
    back, meta = io.read_tiff(io.write_tiff(tmp_path / "l.tif", labels))
    np.testing.assert_array_equal(back, labels)
    assert back.dtype == np.uint16 and meta["pixel_size"] is None


def test_tiff_reads_ome_pixel_size(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "o.ome.tif", np.zeros((8, 8), np.uint16), metadata={"PhysicalSizeX": 0.325,
                     "PhysicalSizeY": 0.325, "axes": "YX"})
    _, meta = io.read_tiff(tmp_path / "o.ome.tif")
    assert meta["pixel_size"] == pytest.approx(0.325)


def test_writes_never_overwrite_unless_asked(tmp_path):
    p = io.write_tiff(tmp_path / "a.tif", np.zeros((4, 4), np.uint8))
    with pytest.raises(FileExistsError, match="a.tif"):
        io.write_tiff(p, np.ones((4, 4), np.uint8))
    assert io.read_tiff(p)[0].max() == 0
    io.write_tiff(p, np.ones((4, 4), np.uint8), overwrite=True)
    assert io.read_tiff(p)[0].max() == 1
    io.write_json(tmp_path / "m.json", {"a": 1})
    with pytest.raises(FileExistsError):
        io.write_json(tmp_path / "m.json", {"a": 2})
    assert io.read_json(tmp_path / "m.json") == {"a": 1}


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError):
        with io.atomic_path(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("crash in the middle")
    assert list(tmp_path.iterdir()) == []


def test_bad_tiff_inputs(tmp_path):
    with pytest.raises(TypeError, match="float64"):
        io.write_tiff(tmp_path / "f.tif", np.zeros((4, 4)))
    with pytest.raises(ValueError, match="2D or 3D"):
        io.write_tiff(tmp_path / "f.tif", np.zeros(4, np.uint8))
    with pytest.raises(FileNotFoundError, match="nope.tif"):
        io.read_tiff(tmp_path / "nope.tif")
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(ValueError, match="junk.tif"):
        io.read_tiff(tmp_path / "junk.tif")


def test_points_csv_round_trip_with_world_coordinates_and_features(tmp_path):
    pts = np.array([[1.25, 2.5], [10.0, 20.0]])
    path = io.write_points_csv(tmp_path / "p.csv", pts, features={"score": [0.5, 0.9], "source": ["model", "manual"]},
                               scale=(0.5, 0.5), translate=(1.0, 2.0))
    header = path.read_text().splitlines()[0].split(",")
    assert header == ["row", "col", "row_world", "col_world", "axis-0", "axis-1", "score", "source"]
    back, feats = io.read_points_csv(path)
    np.testing.assert_allclose(back, pts)
    np.testing.assert_allclose(feats["score"], [0.5, 0.9])
    assert feats["source"].tolist() == ["model", "manual"]
    assert "row_world" not in feats and "axis-0" not in feats
    first = path.read_text().splitlines()[1].split(",")
    assert float(first[2]) == pytest.approx(1.25 * 0.5 + 1.0) and float(first[3]) == pytest.approx(2.5 * 0.5 + 2.0)


def test_points_csv_3d_and_xy_aliases(tmp_path):
    pts = np.array([[0, 1.0, 2.0], [3, 4.0, 5.0]])
    back, _ = io.read_points_csv(io.write_points_csv(tmp_path / "p3.csv", pts))
    np.testing.assert_allclose(back, pts)
    (tmp_path / "xy.csv").write_text("X,Y\n5,7\n6,8\n")
    back, feats = io.read_points_csv(tmp_path / "xy.csv")
    np.testing.assert_allclose(back, [[7, 5], [8, 6]])  # (row, col) = (y, x)
    assert feats == {}


def test_points_csv_errors_name_the_problem(tmp_path):
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="row.*col"):
        io.read_points_csv(tmp_path / "bad.csv")
    (tmp_path / "nan.csv").write_text("row,col\n1,abc\n")
    with pytest.raises(ValueError, match="not a number"):
        io.read_points_csv(tmp_path / "nan.csv")
    with pytest.raises(ValueError, match="shape"):
        io.write_points_csv(tmp_path / "w.csv", np.zeros((3, 4)))
    with pytest.raises(ValueError, match="score"):
        io.write_points_csv(tmp_path / "w.csv", np.zeros((3, 2)), features={"score": [1, 2]})
    empty, _ = io.read_points_csv(io.write_points_csv(tmp_path / "e.csv", np.zeros((0, 2))))
    assert empty.shape == (0, 2)


def test_written_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    p = io.write_json(tmp_path / "m.json", {"a": 1})
    mode = stat.S_IMODE(os.stat(p).st_mode)
    mask = os.umask(0)
    os.umask(mask)
    assert mode == 0o666 & ~mask


def test_points_csv_without_scale_still_names_napari_axes(tmp_path):
    path = io.write_points_csv(tmp_path / "p.csv", np.array([[0.0, 1.0, 2.0]]), features={"score": [0.5]})
    assert path.read_text().splitlines() == ["row,col,plane,axis-0,axis-1,axis-2,score", "1.0,2.0,0.0,0.0,1.0,2.0,0.5"]
    with pytest.raises(ValueError, match="clashes"):
        io.write_points_csv(tmp_path / "q.csv", np.zeros((1, 2)), features={"axis-1": [1.0]})
