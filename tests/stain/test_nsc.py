"""NSC masks: spectral clustering of patch features with a shared anchor."""

import numpy as np
import pytest
from skimage.draw import disk
from sklearn.metrics import adjusted_rand_score

from cellsynth.progress import Cancelled
from cellsynth.stain import NSCParams, cosine_affinity, nsc_channels, nsc_masks, spectral_embedding, synchronise_labels
from cellsynth.stain.features import FilterBankBackbone


def regions(seed=0, size=224, step=56):
    """Cells (medium) with nuclei (bright) on a dark background, plus noise; truth 0/1/2."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((size, size), np.int64)
    for r in range(step // 2, size, step):
        for c in range(step // 2, size, step):
            rr, cc = disk((r + rng.integers(-4, 5), c + rng.integers(-4, 5)), 22, shape=truth.shape)
            truth[rr, cc] = 1
            rr, cc = disk((r, c), 10, shape=truth.shape)
            truth[rr, cc] = 2
    img = np.array([0.1, 0.45, 0.9])[truth] + rng.normal(0, 0.05, truth.shape)
    return (np.clip(img, 0, None) * 1000).astype(np.uint16), truth


def test_recovers_known_regions():
    img, truth = regions()
    res = nsc_masks(img, params=NSCParams(k=3, r=2))
    assert res.labels.shape == img.shape and res.labels.dtype == np.uint8
    assert adjusted_rand_score(truth.ravel(), res.labels.ravel()) >= 0.9
    # labels are numbered by intensity: nuclei brightest, background darkest
    assert np.all(np.diff(res.cluster_means) > 0)
    assert np.mean(res.labels[truth == 2] == 3) > 0.95 and np.mean(res.labels[truth == 0] == 1) > 0.95
    # auto foreground: the brighter group by Otsu's criterion over the clusters = the cells (cytoplasm and
    # nuclei) against the background, as Otsu's threshold splits this image; 'brightest' gives the nuclei
    assert np.mean(res.foreground[truth >= 1]) > 0.95 and np.mean(res.foreground[truth == 0]) < 0.02
    assert res.backbone == "filters"


def test_paper_setting_r5_k5_still_separates_nuclei():
    img, truth = regions(seed=1)
    res = nsc_masks(img)  # k = r = 5
    assert set(np.unique(res.labels)) <= set(range(1, 6))
    assert np.mean(res.foreground[truth == 2]) > 0.9 and np.mean(res.foreground[truth == 0]) < 0.02


def test_anchor_synchronises_labels_across_fields_of_view():
    img, truth = regions(seed=2)
    params = NSCParams(k=3, r=2, fov=112)
    res = nsc_masks(img, params=params)
    # four fields of view; every structure carries one label in all of them
    for region in (0, 1, 2):
        per_fov = []
        for r0 in (0, 112):
            for c0 in (0, 112):
                lab = res.labels[r0:r0 + 112, c0:c0 + 112][truth[r0:r0 + 112, c0:c0 + 112] == region]
                values, counts = np.unique(lab, return_counts=True)
                per_fov.append(values[counts.argmax()])
                assert counts.max() / counts.sum() > 0.9
        assert len(set(per_fov)) == 1, f"region {region} labelled {per_fov} in the four fields of view"
    # an explicit anchor gives the same partition
    res2 = nsc_masks(img, params=params, anchor=img[:112, :112])
    assert adjusted_rand_score(res.labels.ravel(), res2.labels.ravel()) > 0.95


def test_label_mapping_undoes_a_permutation():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 5, 200)
    perm = np.array([3, 0, 4, 1, 2])
    mapping = synchronise_labels(perm[ref], ref, 5)
    assert np.array_equal(mapping[perm[ref]], ref)
    assert synchronise_labels(np.zeros(4, int), np.zeros(4, int), 3).tolist() == [0, -1, -1]


def test_sparse_solver_agrees_with_dense():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(4, 16))
    feats = centres[rng.integers(0, 4, 120)] + 0.5 * rng.normal(size=(120, 16))
    a = cosine_affinity(feats)
    assert a.min() >= 0 and np.allclose(a, a.T) and np.allclose(np.diag(a), 1)
    vs, us = spectral_embedding(a, 5, solver="sparse")
    vd, ud = spectral_embedding(a, 5, solver="dense")
    np.testing.assert_allclose(vs, vd, atol=1e-8)
    assert np.all(np.diff(vs) >= -1e-12) and vs[0] > 0
    # same subspace (eigenvectors agree up to sign / rotation within clusters of eigenvalues)
    sv = np.linalg.svd(us.T @ ud, compute_uv=False)
    np.testing.assert_allclose(sv, 1.0, atol=1e-6)


def test_masks_use_the_sparse_solver_only(monkeypatch):
    import numpy.linalg
    import scipy.linalg
    import scipy.sparse.linalg

    calls = []
    eigsh = scipy.sparse.linalg.eigsh

    def counting_eigsh(*args, **kwargs):
        calls.append(kwargs.get("k"))
        return eigsh(*args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("dense eigendecomposition in the NSC path")

    monkeypatch.setattr(scipy.sparse.linalg, "eigsh", counting_eigsh)
    for mod, name in ((scipy.linalg, "eigh"), (numpy.linalg, "eigh"), (scipy.linalg, "eig"), (numpy.linalg, "eig")):
        monkeypatch.setattr(mod, name, forbidden)
    img, _ = regions(size=112)
    nsc_masks(img, params=NSCParams(k=3, r=2, fov=56))
    assert calls == [3] * 4  # one joint (anchor + field of view) solve per field of view, r + 1 eigenpairs


def test_progress_per_field_of_view_and_cancel():
    img, _ = regions(size=160, step=40)
    events = []
    nsc_masks(img, params=NSCParams(k=3, r=2, fov=80), progress=events.append)
    assert [(e.stage, e.step, e.total) for e in events] == [("nsc", i, 4) for i in range(1, 5)]

    def cancel(p):
        if p.step == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        nsc_masks(img, params=NSCParams(k=3, r=2, fov=80), progress=cancel)


def test_channels_share_progress_and_any_size_works():
    rng = np.random.default_rng(0)
    stack = rng.random((2, 70, 90)) * 0.1
    stack[0, 10:40, 10:40] += 1.0
    stack[1, 40:65, 50:85] += 1.0
    events = []
    res = nsc_channels(stack, params=NSCParams(k=2, r=1, fov=48, input_size=48, patch=4), progress=events.append)
    assert [r.labels.shape for r in res] == [(70, 90), (70, 90)]
    assert res[0].foreground[25, 25] and not res[0].foreground[50, 60]
    assert res[1].foreground[50, 60] and not res[1].foreground[25, 25]
    assert events[-1].step == events[-1].total == 2 * 4


def test_deterministic_and_modes():
    img, truth = regions(size=112)
    p = NSCParams(k=3, r=2, fov=112)
    a, b = nsc_masks(img, params=p), nsc_masks(img, params=p)
    assert np.array_equal(a.labels, b.labels)
    allm = nsc_masks(img, params=NSCParams(k=3, r=2, fov=112, foreground="all"))
    assert np.array_equal(allm.mask, allm.labels)
    bright = nsc_masks(img, params=NSCParams(k=3, r=2, fov=112, foreground="brightest"))
    assert np.array_equal(bright.mask.astype(bool), bright.labels == 3)


def test_tiny_dinov2_backbone():
    torch = pytest.importorskip("torch")
    from transformers import Dinov2Config, Dinov2Model

    from cellsynth.stain.features import Dinov2Backbone

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       patch_size=14, image_size=56)
    bb = Dinov2Backbone(Dinov2Model(cfg), device="cpu")
    feats = bb.features(np.random.default_rng(0).random((3, 64, 64)), 4)
    assert feats.shape == (3, 4, 4, 32) and np.all(np.isfinite(feats))
    img, _ = regions(size=112)
    res = nsc_masks(img, params=NSCParams(k=3, r=2, fov=112, input_size=64, patch=16), backbone=bb)
    assert res.labels.shape == (112, 112) and res.backbone == "dinov2-small"
    assert 1 <= len(np.unique(res.labels)) <= 3


def test_missing_dino_weights_offline_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from cellsynth.stain.features import make_backbone
    from cellsynth.weights import WeightsNotFoundError

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="dinov2-small"):
        make_backbone("dinov2-small", device="cpu", offline=True)


def test_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        nsc_masks(np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="NaN"):
        nsc_masks(np.full((16, 16), np.nan))
    with pytest.raises(TypeError, match="NSCParams"):
        nsc_masks(np.zeros((16, 16)), params={"k": 3})
    with pytest.raises(ValueError, match="multiple of patch"):
        NSCParams(input_size=100, patch=8)
    with pytest.raises(ValueError, match="backbone must be one of"):
        NSCParams(backbone="resnet")
    with pytest.raises(ValueError, match="r must be in"):
        spectral_embedding(np.ones((4, 4)), 3)
    with pytest.raises(ValueError, match="sigmas"):
        FilterBankBackbone(sigmas=(0.0,))


def test_stain_package_imports_stay_light():
    import json
    import subprocess
    import sys

    code = ("import sys, json, cellsynth.stain, cellsynth.stain._cli, cellsynth.stain.nsc, cellsynth.stain.simulate\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(res.stdout.strip().splitlines()[-1]))
    assert not loaded & {"torch", "diffusers", "transformers", "timm", "napari", "qtpy"}


def test_tiny_timm_dino_backbone():
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    from cellsynth.stain.features import TimmDinoBackbone

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0,
                            dynamic_img_size=True)
    bb = TimmDinoBackbone(vit, device="cpu")
    feats = bb.features(np.random.default_rng(0).random((2, 48, 48)), 6)
    assert feats.shape == (2, 6, 6, 32) and np.all(np.isfinite(feats)) and bb.name == "dino-vits8"


def test_auto_foreground_follows_otsu_over_clusters_with_pixel_edges():
    """Dim and bright nuclei on a dark background: 'auto' keeps both (the old halfway rule lost the dim ones),
    and the refined edges follow the true disc outlines to within a pixel."""
    from cellsynth.stain.nsc import otsu_split

    rng = np.random.default_rng(1)
    truth = np.zeros((224, 224), bool)
    img = np.full(truth.shape, 0.05)
    for i, (r, c) in enumerate([(40, 40), (40, 120), (120, 60), (170, 170), (110, 180), (180, 80)]):
        rr, cc = disk((r, c), 14, shape=truth.shape)
        truth[rr, cc] = True
        img[rr, cc] = 0.48 if i % 2 else 0.95  # half the nuclei dim (below halfway between 0.05 and 0.95)
    img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, None)
    res = nsc_masks(img, params=NSCParams(k=4, r=3, fov=112))
    inter, union = np.count_nonzero(res.foreground & truth), np.count_nonzero(res.foreground | truth)
    assert inter / union > 0.85
    crude = nsc_masks(img, params=NSCParams(k=4, r=3, fov=112, refine_boundaries=False))
    crude_iou = np.count_nonzero(crude.foreground & truth) / np.count_nonzero(crude.foreground | truth)
    assert inter / union > crude_iou  # pixel edges beat patch edges
    cut, t = otsu_split(np.array([0.05, 0.5, 0.9]), np.array([9000, 2000, 1000]))
    assert cut == 1 and 0.05 < t < 0.5


def test_nsc_command_writes_its_provenance_beside_the_masks(tmp_path, capsys):
    import json

    import tifffile

    from cellsynth.cli import main

    img = np.zeros((64, 64), np.uint8)
    img[disk((20, 20), 8)] = img[disk((44, 40), 8)] = 200
    tifffile.imwrite(tmp_path / "n.tif", img)
    assert main(["nsc", str(tmp_path / "n.tif"), "--out", str(tmp_path / "m.ome.tif"), "--k", "3", "--r", "2",
                 "--fov", "64"]) == 0
    rec = json.loads((tmp_path / "m.provenance.json").read_text())
    assert rec["operation"] == "nsc" and rec["inputs"][0]["name"] == "n.tif" and len(rec["inputs"][0]["sha256"]) == 64
    assert rec["parameters"]["k"] == 3 and rec["model"]["backbone"] == "filters"
    # nothing is replaced: a second run to the same output is refused before any work, the record kept
    assert main(["nsc", str(tmp_path / "n.tif"), "--out", str(tmp_path / "m.ome.tif")]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("dim", [False, True])
def test_auto_foreground_is_never_worse_than_otsu_on_nuclei(dim):
    """A nuclear stain, nuclei all alike or a few bright among many dim ones (which one global threshold
    misses): NSC's 'auto' foreground agrees with the nuclei at least as well as Otsu's threshold does."""
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(7)
    truth = np.zeros((224, 224), bool)
    img = np.full(truth.shape, 0.04)
    centres = [(20 + 45 * i + rng.uniform(-5, 5), 20 + 45 * j + rng.uniform(-5, 5)) for i in range(5) for j in range(5)]
    for k, c in enumerate(centres):
        rr, cc = disk(c, 9, shape=truth.shape)
        truth[rr, cc] = True
        img[rr, cc] = (0.95 if k % 6 == 0 else rng.uniform(0.15, 0.3)) if dim else rng.uniform(0.7, 0.95)
    img = ndi.gaussian_filter(img, 1.0) + rng.normal(0, 0.01, img.shape)

    def iou(m):
        return np.count_nonzero(m & truth) / np.count_nonzero(m | truth)

    got, otsu = iou(nsc_masks(img, params=NSCParams(fov=112)).foreground), iou(img > threshold_otsu(img))
    assert got >= otsu - 0.005, (got, otsu)
