"""Simulated brightfield / fluorescence pairs and the paired-data folder layout."""

import numpy as np
import pytest

from cellsynth import io
from cellsynth.stain.data import channel_name, read_stain_dataset, write_stain_pair
from cellsynth.stain.simulate import CHANNELS, PLANES, simulate_stain_pair, simulate_stain_pairs


def _pcc(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_pair_structures_are_distinct_and_tied_to_the_cells():
    p = simulate_stain_pair((128, 128), rng=3)
    fl = p.fluorescence.astype(float)
    dna, er, rna, agp, mito = fl
    nuc, cyto = p.nuclei > 0, (p.cells > 0) & (p.nuclei == 0)
    assert dna[nuc].mean() > 3 * dna[p.cells == 0].mean()
    assert er[cyto].mean() > er[nuc].mean() and er[cyto].mean() > 2 * er[p.cells == 0].mean()
    from scipy import ndimage as ndi
    edge = (p.cells > 0) & ~ndi.binary_erosion(p.cells > 0, iterations=2)
    assert agp[edge].mean() > 1.5 * agp[cyto & ~edge].mean()
    assert np.percentile(mito[cyto], 99) > 3 * np.median(mito[cyto])  # puncta
    # distinct channels
    for i in range(5):
        for j in range(i + 1, 5):
            assert _pcc(fl[i], fl[j]) < 0.9, (CHANNELS[i], CHANNELS[j])


def test_brightfield_is_learnable_but_not_trivial():
    from scipy import ndimage as ndi

    def feats(p):
        bf = p.brightfield.astype(float) / 20000
        cols = [np.ones(bf[0].size)]
        for plane in bf:
            for s in (1, 2, 4):
                cols += [ndi.gaussian_filter(plane, s).ravel(), ndi.gaussian_laplace(plane, s).ravel()]
        return np.stack(cols, 1)

    train, test = simulate_stain_pair((128, 128), rng=0), simulate_stain_pair((128, 128), rng=1)
    for ch in (0, 1):
        # no single brightfield plane is a copy of a channel ...
        assert max(abs(_pcc(b, test.fluorescence[ch])) for b in test.brightfield) < 0.7
        # ... but a linear model on a few filters of the planes already predicts it fairly
        w = np.linalg.lstsq(feats(train), train.fluorescence[ch].ravel().astype(float), rcond=None)[0]
        assert _pcc(feats(test) @ w, test.fluorescence[ch]) > 0.4


def test_pairs_folder_layout_order_and_determinism(tmp_path):
    events = []
    root = simulate_stain_pairs(tmp_path / "a", 3, seed=5, shape=(40, 48), progress=events.append)
    assert [e.step for e in events] == [0, 1, 2, 3]  # 0: nothing done yet (a resume starts higher)
    ds = read_stain_dataset(root)
    assert len(ds) == 3 and ds.channels == CHANNELS and ds.brightfield == PLANES
    assert sorted(p.name for p in (root / "fov_0000" / "fluorescence").iterdir())[0] == "0_DNA.tif"
    bf, fl = ds.load(1)
    assert bf.shape == (3, 40, 48) and fl.shape == (5, 40, 48) and bf.dtype == np.float32
    assert io.read_json(root / "stain_pairs.json")["seed"] == 5
    again = read_stain_dataset(simulate_stain_pairs(tmp_path / "b", 2, seed=5, shape=(40, 48)))
    assert np.array_equal(again.load(1)[1], fl)
    with pytest.raises(FileExistsError):
        simulate_stain_pairs(root, 1)
    with pytest.raises(ValueError, match="positive"):
        simulate_stain_pairs(tmp_path / "c", 0)


def test_reader_checks_names_and_sizes(tmp_path):
    bf, fl = np.zeros((2, 8, 8), np.uint16), np.zeros((1, 8, 8), np.uint16)
    write_stain_pair(tmp_path / "f0", bf, fl, brightfield_names=["a", "b"], channel_names=["X"])
    write_stain_pair(tmp_path / "f1", bf, fl, brightfield_names=["a", "b"], channel_names=["Y"])
    with pytest.raises(ValueError, match="channels"):
        read_stain_dataset(tmp_path)
    with pytest.raises(ValueError, match="no field of view"):
        read_stain_dataset(tmp_path / "f0" / "brightfield")
    with pytest.raises(FileNotFoundError):
        read_stain_dataset(tmp_path / "missing")
    assert channel_name("12_Mito.tiff") == "Mito" and channel_name("ER.tif") == "ER"


def test_written_order_survives_ten_or_more_channels(tmp_path):
    names = [f"ch{chr(ord('a') + i)}" for i in range(12)]
    fl = np.arange(12, dtype=np.uint16)[:, None, None] * np.ones((1, 4, 4), np.uint16)
    write_stain_pair(tmp_path / "f0", np.zeros((1, 4, 4), np.uint16), fl, brightfield_names=["z0"],
                     channel_names=names)
    ds = read_stain_dataset(tmp_path)
    assert list(ds.channels) == names  # "2_chc" before "10_chk", as written
    assert ds.load(0)[1][:, 0, 0].tolist() == list(range(12))
