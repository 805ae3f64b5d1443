"""Result TIFFs are OME-TIFF with pixel size and channel names; OME-Zarr images open through the TIFF reader."""

import json

import numpy as np
import pytest

from cellsynth import io


def test_result_tiffs_are_ome_with_pixel_size_and_channel_names(tmp_path):
    import tifffile

    data = np.arange(3 * 16 * 20, dtype=np.uint16).reshape(3, 16, 20)
    p = io.write_tiff(tmp_path / "stain.ome.tif", data, pixel_size=0.325, channel_names=["DNA", "ER", "Mito"])
    with tifffile.TiffFile(p) as tif:
        assert tif.is_ome
        xml = tif.ome_metadata
        assert 'PhysicalSizeX="0.325"' in xml and 'Name="DNA"' in xml and 'Name="Mito"' in xml
        num, den = tif.pages[0].tags["XResolution"].value  # plain ImageJ reads the resolution tags
        assert den / num * 1e4 == pytest.approx(0.325)
    back, meta = io.read_tiff(p)
    np.testing.assert_array_equal(back, data)
    assert meta["axes"] == "CYX" and meta["channel_names"] == ["DNA", "ER", "Mito"]
    assert meta["pixel_size"] == pytest.approx(0.325)
    stack, smeta = io.read_tiff(io.write_tiff(tmp_path / "stack.tif", data))
    assert smeta["axes"] == "ZYX" and smeta["channel_names"] is None and smeta["pixel_size"] is None
    with pytest.raises(ValueError, match="2 channel names given for an array of shape"):
        io.write_tiff(tmp_path / "bad.tif", data, channel_names=["a", "b"])
    assert not (tmp_path / "bad.tif").exists()


def _ome_zarr(path, data, *, scale=0.5):
    """An OME-Zarr 0.4 image (zarr format 2) written with zarr itself, by the specification."""
    import zarr

    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    root.create_array("0", data=data, chunks=(1,) + data.shape[1:])
    root.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, scale, scale]}]}],
    }]
    root.attrs["omero"] = {"channels": [{"label": "nuclei"}, {"label": "membrane"}]}
    return path


def test_ome_zarr_opens_through_the_tiff_reader_and_counts(tmp_path, capsys):
    pytest.importorskip("zarr")
    from cellsynth.cli import main
    from cellsynth.count.data import read_image_axes
    from cellsynth.layouts import LayoutParams, generate_layout

    lay = generate_layout(LayoutParams(shape=(64, 64), count_mean=8, count_std=0, max_overlap=0.0), rng=1)
    data = np.stack([lay.image, np.zeros_like(lay.image)])
    z = _ome_zarr(tmp_path / "cells.ome.zarr", data)
    assert io.is_ome_zarr(z) and not io.is_ome_zarr(tmp_path)
    back, meta = io.read_tiff(z)
    np.testing.assert_array_equal(back, data)
    assert meta["axes"] == "CYX" and meta["pixel_size"] == pytest.approx(0.5)
    assert meta["channel_names"] == ["nuclei", "membrane"]
    image, axis = read_image_axes(z)
    assert axis == 0 and image.shape == (2, 64, 64)
    assert main(["count", str(z), "--model", "classic", "--channel", "0", "--diameter", "15", "--json", "--quiet"]) == 0
    n = json.loads(capsys.readouterr().out)["count"]
    assert abs(n - lay.n_cells) <= 2
    broken = tmp_path / "broken.zarr"
    broken.mkdir()
    (broken / ".zattrs").write_text(json.dumps({"multiscales": [{"datasets": [{"path": "missing"}]}]}))
    with pytest.raises(ValueError, match="not a readable OME-Zarr image"):
        io.read_tiff(broken)


def test_same_data_same_bytes(tmp_path):
    data = np.arange(64, dtype=np.uint8).reshape(8, 8)
    a = io.write_tiff(tmp_path / "a.tif", data, pixel_size=0.5)
    b = io.write_tiff(tmp_path / "b.tif", data, pixel_size=0.5)
    c = io.write_tiff(tmp_path / "c.tif", data + 1, pixel_size=0.5)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
