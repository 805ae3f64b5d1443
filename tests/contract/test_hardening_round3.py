"""Inputs that used to give silent wrong answers: alpha planes, stacks without axes (exit 0, wrong count)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from cellsynth.cli import main


def _disks(n: int, *, shape=(96, 96), radius=4, seed=0) -> np.ndarray:
    """A plane of ``n`` separated bright disks on a dark background (uint8)."""
    from skimage.draw import disk

    rng = np.random.default_rng(seed)
    img = np.full(shape, 10, np.uint8)
    centres: list = []
    while len(centres) < n:
        c = rng.uniform(radius + 2, np.array(shape) - radius - 2)
        if all(np.hypot(*(c - d)) > 3 * radius for d in centres):
            centres.append(c)
            img[disk(tuple(c), radius, shape=shape)] = 200
    return img


def _count(capsys, path, *extra) -> dict:
    assert main(["count", str(path), "--diameter", "8", "--json", "--quiet", *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("model", ["classic", "default"])
@pytest.mark.parametrize("kind", ["png", "tiff"])
def test_rgba_files_count_their_colour_not_their_alpha(tmp_path, capsys, kind, model):
    grey = _disks(12)
    rgba = np.zeros(grey.shape + (4,), np.uint8)
    rgba[..., 0], rgba[..., 3] = grey, 255  # nuclei in red, opaque
    path = tmp_path / f"rgba.{'png' if kind == 'png' else 'tif'}"
    if kind == "png":
        from skimage.io import imsave

        imsave(path, rgba, check_contrast=False)
    else:
        tifffile.imwrite(path, rgba, photometric="rgb", extrasamples=["unassalpha"])
    tifffile.imwrite(tmp_path / "grey.tif", grey)
    got = _count(capsys, path, "--model", model)["count"]
    assert got == _count(capsys, tmp_path / "grey.tif", "--model", model)["count"]
    assert abs(got - 12) <= 1


def test_grey_plus_alpha_png_counts_the_grey(tmp_path, capsys):
    from skimage.io import imsave

    grey = _disks(9, seed=2)
    imsave(tmp_path / "la.png", np.stack([grey, np.full_like(grey, 255)], axis=-1), check_contrast=False)
    assert abs(_count(capsys, tmp_path / "la.png", "--model", "classic")["count"] - 9) <= 1


def test_planes_written_without_axes_are_a_stack(tmp_path, capsys):
    """``tifffile.imwrite`` of 4 planes with no axes stores them as planar samples: a stack, not RGBA."""
    stack = np.stack([_disks(n, seed=n) for n in (10, 20, 30, 40)])
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack)
    doc = _count(capsys, path, "--model", "classic")
    assert [abs(a - b) <= 1 for a, b in zip(doc["per_plane"], (10, 20, 30, 40))] == [True] * 4
    assert main(["count", str(path), "--diameter", "8", "--model", "classic", "--quiet"]) == 0
    assert "in 4 planes" in capsys.readouterr().out
    # count-batch reads the file the same way
    from cellsynth.batch.sources import open_image

    im = open_image(path)
    assert im.n_planes == 4 and im.channel_axis is None
    assert np.array_equal(np.asarray(im.plane((2,))[0]), stack[2])


def test_rgba_tiff_opened_lazily_leaves_out_alpha(tmp_path):
    from cellsynth.batch.sources import open_image, read_small_plane

    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 7, 255
    tifffile.imwrite(tmp_path / "a.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    im = open_image(tmp_path / "a.tif")
    assert im.shape == (40, 50, 3) and im.n_planes == 1
    plane, ch = im.plane(())
    assert ch == 2 and np.asarray(plane).max() == 7
    assert read_small_plane(tmp_path / "a.tif", 10**6) is None  # left to open_image


@pytest.mark.parametrize("make", [lambda g: g.astype(np.float64) * 1e-300, lambda g: g.astype(np.int64) - 10**12,
                                  lambda g: g.astype(np.uint64) + np.uint64(2**62)],
                         ids=["float64-1e-300", "int64-offset", "uint64-offset"])
@pytest.mark.parametrize("model", ["classic", "default"])
def test_tiny_or_offset_ranges_keep_their_contrast(tmp_path, capsys, make, model):
    grey = _disks(7, seed=4)
    tifffile.imwrite(tmp_path / "x.tif", make(grey))
    assert abs(_count(capsys, tmp_path / "x.tif", "--model", model)["count"] - 7) <= 1


def test_flat_images_stay_flat_in_every_type():
    from cellsynth.count.preprocess import normalize_image

    for x in (np.full((8, 8), 1e-300), np.full((8, 8), -10**12, np.int64), np.full((8, 8), 3.0, np.float32)):
        assert not normalize_image(x).any()


def test_a_diverged_training_is_never_saved(tmp_path, capsys):
    ds = tmp_path / "ds"
    assert main(["layouts", "--n", "2", "--size", "64", "64", "--count-mean", "6", "--out", str(ds)]) == 0
    capsys.readouterr()
    rc = main(["train-counter", str(ds), "--out", str(tmp_path / "m"), "--lr", "1e6", "--epochs", "3",
               "--steps-per-epoch", "2", "--batch-size", "2", "--crop", "64", "--backbone", "test_efficientnet",
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: training diverged") and "--lr" in err
    assert not (tmp_path / "m" / "model.safetensors").exists()


@pytest.mark.parametrize("engine", ["onnxruntime", "torch"])
def test_a_counter_giving_non_finite_values_says_so(tmp_path, engine):
    import torch

    from cellsynth.count import count_cells, load_counter
    from cellsynth.count._nets import build_net
    from cellsynth.count.models import counter_config, save_counter

    torch.manual_seed(0)
    cfg = counter_config("density", backbone="test_efficientnet", blocks=3)
    net = build_net(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(3e38)  # finite weights (they save), outputs that overflow
    path = save_counter(net, cfg, tmp_path / "broken")
    with pytest.raises(ValueError, match="NaN or infinite values"):
        count_cells(_disks(5), counter=load_counter(path), diameter=8, engine=engine)


@pytest.mark.parametrize("command", ["evaluate-counter", "train-counter"])
@pytest.mark.parametrize("bad", ["../outside.tif", "ABS", "images/link.tif"])
def test_dataset_manifests_cannot_name_files_outside_their_folder(tmp_path, capsys, command, bad):
    ds = tmp_path / "ds"
    assert main(["layouts", "--n", "2", "--size", "32", "32", "--count-mean", "3", "--out", str(ds)]) == 0
    tifffile.imwrite(tmp_path / "outside.tif", _disks(3, shape=(32, 32), radius=2))
    (ds / "images" / "link.tif").symlink_to(tmp_path / "outside.tif")
    doc = json.loads((ds / "manifest.json").read_text())
    doc["items"][1]["image"] = str(tmp_path / "outside.tif") if bad == "ABS" else bad
    (ds / "manifest.json").write_text(json.dumps(doc))
    capsys.readouterr()
    args = ["--model", "classic"] if command == "evaluate-counter" else ["--out", str(tmp_path / "m"), "--quiet"]
    assert main([command, str(ds), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and ("outside its folder" in err or "relative path" in err)


@pytest.mark.parametrize("command", [["count", "IMG", "--model", "classic", "--quiet"], ["count-batch", "IMG", "--out", "OUT"],
                                     ["layouts", "--n", "1", "--size", "32", "32", "--out", "OUT"]])
@pytest.mark.parametrize("case", ["env", "folder", "file"])
def test_settings_that_cannot_work_stop_every_command(tmp_path, capsys, monkeypatch, command, case):
    tifffile.imwrite(tmp_path / "img.tif", _disks(3, shape=(32, 32), radius=2))
    if case == "env":
        monkeypatch.setenv("CELLSYNTH_DEVICE", "banana")
        where = "CELLSYNTH_DEVICE"
    else:
        path = tmp_path / "settings"
        if case == "folder":
            path.mkdir()
        else:
            path.write_text('{"device": "tpu"}')
        monkeypatch.setenv("CELLSYNTH_SETTINGS", str(path))
        where = str(path)
    args = [str(tmp_path / "img.tif") if a == "IMG" else str(tmp_path / "out") if a == "OUT" else a for a in command]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and where in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("points, region, what", [
    ("1e308,1e308", None, "outside the image"),
    ("-3,5", None, "outside the image"),
    ("5,40", None, "outside the image"),
    ("5,5", ["-5", "-5", "10", "10"], "reaches outside the image"),
    ("5,5", ["0", "0", "10", "99"], "reaches outside the image"),
])
def test_retrain_refuses_points_and_regions_outside_the_image(tmp_path, capsys, points, region, what):
    tifffile.imwrite(tmp_path / "img.tif", _disks(3, shape=(32, 32), radius=2))
    (tmp_path / "p.csv").write_text(f"row,col\n10,10\n{points}\n")
    args = ["retrain-counter", str(tmp_path / "img.tif"), str(tmp_path / "p.csv"), "--out", str(tmp_path / "m")]
    if region:
        args += ["--region", *region]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and what in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


def _bad_inputs(root):
    """The inputs of the one-line-error cases below, made once."""
    import struct
    import zipfile
    import zlib

    from skimage.io import imsave

    tifffile.imwrite(root / "one.tif", _disks(3, shape=(32, 32), radius=2))
    tifffile.imwrite(root / "bf_complex.tif", (np.ones((3, 32, 32)) + 1j).astype(np.complex64))
    imsave(root / "small.png", _disks(2, shape=(32, 32), radius=2), check_contrast=False)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nxxxx")
    (root / "empty.png").write_bytes(b"")

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0)  # declares 10**10 pixels
    (root / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
                                    + chunk(b"IEND", b""))
    with zipfile.ZipFile(root / "notyaml.zip", "w") as z:
        z.writestr("rdf.yaml", "a: [b\n  c: : :")
    with zipfile.ZipFile(root / "pytag.zip", "w") as z:
        z.writestr("rdf.yaml", f'x: !!python/object/apply:os.system ["touch {root / "RAN"}"]\n')
    (root / "tok.pt").write_bytes(b"not a token")
    fovs = root / "pairs"
    for name, subs in (("a", ("brightfield", "fluorescence")), ("b", ("brightfield",))):
        for sub in subs:
            (fovs / name / sub).mkdir(parents=True)
            tifffile.imwrite(fovs / name / sub / "0_x.tif", np.ones((16, 16), np.float32))
    assert main(["layouts", "--n", "2", "--size", "32", "32", "--count-mean", "3", "--out", str(root / "ds")]) == 0


CASES = {
    "stain complex": (["stain", "{r}/bf_complex.tif", "--out", "{r}/o"], "real numbers"),
    "nsc channel": (["nsc", "{r}/one.tif", "--channel", "5", "--out", "{r}/o.tif"], "--channel 5 does not exist"),
    "train-stain half pair": (["train-stain", "{r}/pairs", "--out", "{r}/o"], "no 'fluorescence/' folder"),
    "train-stain channels": (["train-stain", "{r}/pairs", "--block-out-channels", "-8", "16", "--out", "{r}/o"],
                             "--block-out-channels must"),
    "train-stain timesteps": (["train-stain", "{r}/pairs", "--timesteps", "0", "--out", "{r}/o"], "--timesteps must"),
    "import-token placeholder": (["import-token", "{r}/tok.pt", "--placeholder", "", "--out", "{r}/o"],
                                 "placeholder must be one word"),
    "train-counter backbone": (["train-counter", "{r}/ds", "--backbone", "banana", "--out", "{r}/o"],
                               "not a timm model"),
    "train-counter cutmix": (["train-counter", "{r}/ds", "--strategy", "cutmix", "--out", "{r}/o"], "--synthetic"),
    "count rdf not yaml": (["count", "{r}/one.tif", "--model", "{r}/notyaml.zip"], "not valid YAML"),
    "count rdf python tag": (["count", "{r}/one.tif", "--model", "{r}/pytag.zip"], "not plain YAML data"),
}
for _kind in ("broken", "empty", "bomb"):
    _why = {"broken": "not a readable PNG", "empty": "empty (0 bytes)", "bomb": "not a readable PNG"}[_kind]
    CASES[f"stylize content {_kind}"] = (["stylize", f"{{r}}/{_kind}.png", "--style", "{r}/small.png", "--token", "t",
                                          "--model", "m", "--out", "{r}/o.tif"], _why)
    CASES[f"stylize style {_kind}"] = (["stylize", "{r}/small.png", "--style", f"{{r}}/{_kind}.png", "--token", "t",
                                        "--model", "m", "--out", "{r}/o.tif"], _why)
    CASES[f"train-style {_kind}"] = (["train-style", f"{{r}}/{_kind}.png", "--model", "m", "--out", "{r}/o"], _why)


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    _bad_inputs(root)
    return root


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_one_error_line(bad_root, capsys, case):
    args, why = CASES[case]
    capsys.readouterr()
    rc = main([a.format(r=bad_root) for a in args])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error:") and why in lines[0], err
    assert not (bad_root / "o").exists() and not (bad_root / "o.tif").exists() and not (bad_root / "RAN").exists()


@pytest.mark.parametrize("command", [["count-batch", "{r}/one.tif", "--out", "{r}/o"],
                                     ["layouts", "--n", "2", "--size", "32", "32", "--out", "{r}/o"]])
def test_more_workers_than_the_machine_can_run_are_refused_at_once(bad_root, capsys, command):
    import time

    t = time.perf_counter()
    assert main([a.format(r=bad_root) for a in command] + ["--workers", "1000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --workers 1000 is more than this machine can run") and "use at most" in err
    assert time.perf_counter() - t < 10 and not (bad_root / "o").exists()


def test_demo_without_a_display_says_how_to_run_it(tmp_path, capsys, monkeypatch):
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("sys.platform", "linux")
    assert main(["demo", "--screenshot", str(tmp_path / "d.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no display") and "xvfb-run -a cellsynth demo --screenshot" in err
    assert not (tmp_path / "d.png").exists()


def test_count_can_leave_out_nuclei_cut_by_the_border(tmp_path, capsys):
    from skimage.draw import disk

    img = np.full((64, 64), 10, np.uint8)
    for c in ((2, 30), (30, 30), (30, 62), (50, 15)):  # two cut by the border, two inside
        img[disk(c, 4, shape=img.shape)] = 200
    tifffile.imwrite(tmp_path / "b.tif", img)
    whole = _count(capsys, tmp_path / "b.tif", "--model", "classic")
    inner = _count(capsys, tmp_path / "b.tif", "--model", "classic", "--exclude-border")
    assert whole["count"] == 4 and inner["count"] == 2 and inner["left_out_border"] == 2
    assert sorted(map(tuple, np.rint(inner["points"]).astype(int).tolist())) == [(30, 30), (50, 15)]
    stack = np.stack([img, img[::-1]])
    tifffile.imwrite(tmp_path / "s.tif", stack, imagej=True, metadata={"axes": "TYX"})
    doc = _count(capsys, tmp_path / "s.tif", "--model", "classic", "--exclude-border")
    assert doc["per_plane"] == [2, 2] and doc["count"] == 4


def test_counts_in_regions_from_napari_shapes_and_geojson(tmp_path, capsys):
    """Cells per region on a synthetic image whose truth is known; both region formats agree."""
    from skimage.draw import disk

    img = np.full((100, 200), 10, np.uint8)
    left = [(20, 20), (20, 60), (60, 40), (80, 80)]  # 4 in the left half
    right = [(30, 140), (70, 160)]  # 2 in the ellipse on the right
    for c in left + right + [(90, 190)]:  # one more outside both regions
        img[disk(c, 4, shape=img.shape)] = 200
    tifffile.imwrite(tmp_path / "img.tif", img, resolution=(2.0, 2.0), metadata={"unit": "um"}, imagej=True)
    (tmp_path / "shapes.csv").write_text(
        "index,shape-type,vertex-index,axis-0,axis-1\n"
        "0,rectangle,0,0,0\n0,rectangle,1,0,99\n0,rectangle,2,99,99\n0,rectangle,3,99,0\n"
        "1,ellipse,0,10,120\n1,ellipse,1,10,180\n1,ellipse,2,90,180\n1,ellipse,3,90,120\n")
    geo = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"name": "left half"},
         "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [99, 0], [99, 99], [0, 99], [0, 0]]]}}]}
    (tmp_path / "regions.geojson").write_text(json.dumps(geo))
    doc = _count(capsys, tmp_path / "img.tif", "--model", "classic", "--regions", str(tmp_path / "shapes.csv"))
    assert doc["count"] == 7 and [r["count"] for r in doc["regions"]] == [4, 2]
    first = doc["regions"][0]
    assert first["area_px"] == 100 * 100 and first["area_um2"] == 2500.0 and first["per_mm2"] == 1600.0
    doc = _count(capsys, tmp_path / "img.tif", "--model", "classic", "--regions", str(tmp_path / "regions.geojson"))
    assert [(r["region"], r["count"]) for r in doc["regions"]] == [("left half", 4)]
    assert main(["count", str(tmp_path / "img.tif"), "--diameter", "8", "--model", "classic", "--quiet",
                 "--regions", str(tmp_path / "shapes.csv"), "--out", str(tmp_path / "p.csv")]) == 0
    assert "region 2: 2 cells" in capsys.readouterr().out
    # per nucleus: pixels, micrometres (0.5 µm per pixel), score, source and the region it lies in
    import csv

    with open(tmp_path / "p.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {"row", "col", "row_world", "col_world", "score", "source", "region"} <= set(rows[0])
    assert all(abs(float(r["row_world"]) - 0.5 * float(r["row"])) < 1e-6 for r in rows)
    assert sorted(r["region"] for r in rows) == [""] + ["region 1"] * 4 + ["region 2"] * 2


@pytest.mark.parametrize("content, name, why", [
    ("a,b\n1,2\n", "r.csv", "not napari's shapes CSV"),
    ("index,shape-type,vertex-index,axis-0,axis-1\n0,path,0,1,1\n0,path,1,5,5\n0,path,2,9,1\n", "r.csv",
     "not an area"),
    ('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Point", '
     '"coordinates": [1, 2]}}]}', "r.geojson", "not an area"),
    ("index,shape-type,vertex-index,axis-0,axis-1\n0,rectangle,0,500,500\n0,rectangle,1,500,600\n"
     "0,rectangle,2,600,600\n0,rectangle,3,600,500\n", "r.csv", "holds no pixel"),
    ("x", "r.shp", "shapes CSV (.csv) or GeoJSON"),
])
def test_bad_regions_get_one_error_line(tmp_path, capsys, content, name, why):
    tifffile.imwrite(tmp_path / "img.tif", _disks(3, shape=(64, 64), radius=3))
    (tmp_path / name).write_text(content)
    assert main(["count", str(tmp_path / "img.tif"), "--regions", str(tmp_path / name), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and why in err and len(err.strip().splitlines()) == 1


def test_a_count_writes_its_provenance_and_redoes_itself_from_it(tmp_path, capsys):
    from cellsynth.weights import file_sha256

    img = tmp_path / "img.tif"
    tifffile.imwrite(img, _disks(9, shape=(96, 96), radius=4, seed=5))
    out = tmp_path / "points.csv"
    assert main(["count", str(img), "--model", "classic", "--out", str(out), "--exclude-border", "--quiet"]) == 0
    capsys.readouterr()
    rec = json.loads((tmp_path / "points.provenance.json").read_text())
    assert rec["inputs"][0]["sha256"] == file_sha256(img) and rec["inputs"][0]["name"] == "img.tif"
    assert rec["model"]["kind"] == "classic" and rec["parameters"]["exclude_border"] is True
    assert rec["parameters"]["diameter"] == "auto" and rec["result"]["diameter_source"] == "estimated"
    assert rec["cellsynth_version"] and rec["created"] and rec["command"].startswith("cellsynth count ")
    again = tmp_path / "again.csv"
    assert main(["count", "--from-provenance", str(tmp_path / "points.provenance.json"), "--out", str(again),
                 "--quiet"]) == 0
    assert again.read_text() == out.read_text()  # the same points
    old = {k: v for k, v in rec.items() if k not in ("inputs", "parameters")}  # a record of an earlier version
    old.update(input=rec["inputs"][0], settings=rec["parameters"])
    (tmp_path / "earlier.provenance.json").write_text(json.dumps(old))
    assert main(["count", "--from-provenance", str(tmp_path / "earlier.provenance.json"), "--out",
                 str(tmp_path / "old.csv"), "--quiet"]) == 0
    assert (tmp_path / "old.csv").read_text() == out.read_text()
    # nothing is overwritten without --overwrite, the provenance file included
    (tmp_path / "p2.provenance.json").write_text("mine")
    assert main(["count", str(img), "--model", "classic", "--out", str(tmp_path / "p2.csv"), "--quiet"]) == 2
    assert (tmp_path / "p2.provenance.json").read_text() == "mine" and not (tmp_path / "p2.csv").exists()
    # a changed image is refused
    capsys.readouterr()
    tifffile.imwrite(img, _disks(4, shape=(96, 96), radius=4, seed=6))
    assert main(["count", "--from-provenance", str(tmp_path / "points.provenance.json"), "--quiet"]) == 2
    assert "has changed since the count" in capsys.readouterr().err


def _two_markers(tmp_path):
    """Nuclei in channel 0; a marker in 8 of 20 (channel 1), another in 5 of them (channel 2)."""
    from skimage.draw import disk

    rng = np.random.default_rng(3)
    img = np.zeros((3, 160, 160), np.uint16)
    img += rng.integers(0, 20, img.shape).astype(np.uint16)
    centres: list = []
    while len(centres) < 20:
        c = rng.uniform(12, 148, 2)
        if all(np.hypot(*(c - d)) > 22 for d in centres):
            centres.append(c)
    for k, c in enumerate(centres):
        rr, cc = disk(tuple(c), 6, shape=img.shape[1:])
        img[0, rr, cc] += 800
        if k < 8:
            img[1, rr, cc] += 600 + 40 * k  # positive, of several brightnesses
        else:
            img[1, rr, cc] += 30  # a little background in the nucleus
        if k % 4 == 0:
            img[2, rr, cc] += 500
    path = tmp_path / "markers.tif"
    tifffile.imwrite(path, img, imagej=True, metadata={"axes": "CYX"})
    return path


def test_marker_positive_classes_are_counted_within_two_points(tmp_path, capsys):
    path = _two_markers(tmp_path)
    doc = _count(capsys, path, "--model", "classic", "--channel", "0", "--measure-channels", "1,2",
                 "--marker-names", "Ki67,EdU", "--out", str(tmp_path / "p.csv"))
    m = doc["markers"]
    assert doc["count"] == 20 and m["threshold_method"] == "otsu" and m["names"] == ["Ki67", "EdU"]
    got = {r["class"]: r["count"] for r in m["classes"]}
    # truth: k < 8 Ki67+; k % 4 == 0 EdU+ (k = 0, 4 are both; 8, 12, 16 EdU only)
    assert got == {"negative": 9, "Ki67+": 6, "EdU+": 3, "Ki67+ EdU+": 2}
    assert abs(sum(r["percent"] for r in m["classes"]) - 100) < 0.1
    header = (tmp_path / "p.csv").read_text().splitlines()[0].split(",")
    assert {"mean_Ki67", "mean_EdU", "class"} <= set(header)
    # a typed threshold above every nucleus: all negative for that channel
    doc = _count(capsys, path, "--model", "classic", "--channel", "0", "--measure-channels", "1",
                 "--thresholds", "5000")
    assert {r["class"]: r["count"] for r in doc["markers"]["classes"]} == {"negative": 20, "ch1+": 0}


@pytest.mark.parametrize("extra, why", [
    (["--measure-channels", "7"], "the image has channels 0..2"),
    (["--measure-channels", "a,b"], "channel numbers separated by commas"),
    (["--measure-channels", "1", "--thresholds", "x"], "'auto' or numbers"),
    (["--measure-channels", "1,2", "--thresholds", "5"], "one finite number per measured channel"),
    (["--thresholds", "5"], "go with --measure-channels"),
])
def test_bad_marker_options_get_one_error_line(tmp_path, capsys, extra, why):
    path = _two_markers(tmp_path)
    assert main(["count", str(path), "--model", "classic", "--channel", "0", "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and why in err and len(err.strip().splitlines()) == 1
