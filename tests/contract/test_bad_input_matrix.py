"""Bad inputs against every command: a correct result or one ``error:`` line with exit status 2.

Each case calls the command line's ``main()`` in this process (no subprocess) on tiny files. The
outcome is checked the same way for all: no traceback, exit status 0 or 2, on 2 a last stderr line
holding ``error:`` and no other error text, and the input files and earlier outputs byte-for-byte
unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellsynth.cli import main

RNG = np.random.default_rng(0)
BLOBS = np.zeros((48, 48), np.uint8)
BLOBS[8:16, 8:16] = 200
BLOBS[30:38, 26:34] = 180


def _tif(path: Path, data, **kw) -> None:
    tifffile.imwrite(path, data, **kw)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    _tif(d / "ok.tif", BLOBS)
    raw = (d / "ok.tif").read_bytes()
    (d / "empty.tif").write_bytes(b"")
    (d / "trunc_header.tif").write_bytes(raw[:6])
    (d / "trunc_ifd.tif").write_bytes(raw[:12])
    (d / "trunc_half.tif").write_bytes(raw[: len(raw) // 2])
    (d / "text.tif").write_text("this is not an image\n")
    (d / "wrongext.tif").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    from skimage.io import imsave

    imsave(d / "ok.png", BLOBS, check_contrast=False)
    png = (d / "ok.png").read_bytes()
    (d / "empty.png").write_bytes(b"")
    (d / "trunc8.png").write_bytes(png[:8])
    (d / "trunc_half.png").write_bytes(png[: len(png) // 2])
    (d / "text.png").write_text("not a png")
    (d / "image.bmp").write_bytes(b"BM" + b"\0" * 60)
    # shapes and dtypes
    _tif(d / "1d.tif", np.arange(10, dtype=np.uint8))
    _tif(d / "1x1.tif", np.array([[7]], np.uint8))
    _tif(d / "2x2.tif", np.array([[0, 255], [255, 0]], np.uint8))
    _tif(d / "thin.tif", np.tile(BLOBS[:, :3], (1, 1)))
    _tif(d / "elongated.tif", np.tile(BLOBS[:4], (1, 20)))
    _tif(d / "stack.tif", np.stack([BLOBS] * 3), photometric="minisblack")
    _tif(d / "4d.tif", np.stack([np.stack([BLOBS] * 2)] * 2))
    _tif(d / "5d.tif", np.zeros((2, 2, 2, 16, 16), np.uint8))
    _tif(d / "6d.tif", np.zeros((2, 1, 2, 1, 16, 16), np.uint8), imagej=False)
    _tif(d / "rgb.tif", np.stack([BLOBS] * 3, axis=-1), photometric="rgb")
    _tif(d / "rgba.tif", np.dstack([BLOBS] * 3 + [np.full_like(BLOBS, 255)]), photometric="rgb")
    _tif(d / "const.tif", np.full((48, 48), 9, np.uint8))
    _tif(d / "zeros.tif", np.zeros((48, 48), np.float32))
    for dt in ("int8", "uint16", "int16", "int32", "uint32", "float16", "float32", "float64", "bool", "complex64",
               "int64", "uint64"):
        _tif(d / f"{dt}.tif", (BLOBS > 100).astype(dt) * (1 if dt == "bool" else 100))
    nan = BLOBS.astype(np.float32)
    nan[3, 3] = np.nan
    _tif(d / "nan.tif", nan)
    inf = BLOBS.astype(np.float32)
    inf[3, 3] = np.inf
    _tif(d / "inf.tif", inf)
    _tif(d / "allnan.tif", np.full((48, 48), np.nan, np.float32))
    # model files
    from cellsynth.weights import resources_dir

    default = resources_dir() / "models" / "counter-default"
    for name in ("m_list", "m_nokeys", "m_corrupt", "m_trunc", "m_shape", "m_zero_diameter", "m_pickle",
                 "m_nan_diameter", "m_bad_backbone"):
        shutil.copytree(default, d / name)
    cfg = json.loads((default / "config.json").read_text())
    (d / "m_list" / "config.json").write_text("[1, 2]")
    (d / "m_nokeys" / "config.json").write_text('{"format": "cellsynth-counter"}')
    (d / "m_corrupt" / "model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{\"a\": 1}garbage")
    w = (default / "model.safetensors").read_bytes()
    (d / "m_trunc" / "model.safetensors").write_bytes(w[: len(w) // 3])
    import torch
    from safetensors.torch import save_file

    save_file({"stem.0.weight": torch.zeros(3, 3)}, str(d / "m_shape" / "model.safetensors"))
    (d / "m_zero_diameter" / "config.json").write_text(json.dumps({**cfg, "diameter": 0}))
    (d / "m_nan_diameter" / "config.json").write_text(json.dumps({**cfg, "diameter": "NaN"}))
    (d / "m_bad_backbone" / "config.json").write_text(json.dumps({**cfg, "backbone": "no_such_net"}))
    (d / "m_pickle" / "model.safetensors").unlink()
    shutil.copytree(default, d / "m_huge")
    with open(d / "m_huge" / "model.safetensors", "r+b") as fh:  # sparse: claims far more than the free memory
        fh.truncate(1 << 40)
    (d / "evil.pt").write_bytes(b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94"
                                b"\x93\x94\x8c\x04true\x94\x85\x94R\x94.")
    (d / "garbage.pt").write_bytes(os.urandom(256))
    (d / "garbage.safetensors").write_bytes(os.urandom(256))
    # stain model folders
    from cellsynth.stain.model import default_model_dir

    for name in ("s_list", "s_zero_groups", "s_corrupt", "s_shape", "s_huge"):
        shutil.copytree(default_model_dir(), d / name)
    with open(d / "s_huge" / "model.safetensors", "r+b") as fh:
        fh.truncate(1 << 40)
    scfg = json.loads((default_model_dir() / "config.json").read_text())
    (d / "s_list" / "config.json").write_text("[]")
    bad = json.loads(json.dumps(scfg))
    bad["config"]["norm_num_groups"] = 0
    (d / "s_zero_groups" / "config.json").write_text(json.dumps(bad))
    (d / "s_corrupt" / "model.safetensors").write_bytes(b"\xff" * 64)
    save_file({"conv_in.weight": torch.zeros(1)}, str(d / "s_shape" / "model.safetensors"))
    # datasets and outputs
    assert main(["layouts", "--n", "2", "--size", "48", "48", "--count-mean", "6", "--count-std", "1",
                 "--out", str(d / "ds")]) == 0
    shutil.copytree(d / "ds", d / "ds_list")
    (d / "ds_list" / "manifest.json").write_text("[1, 2]")
    shutil.copytree(d / "ds", d / "ds_items_not_objects")
    doc = json.loads((d / "ds" / "manifest.json").read_text())
    (d / "ds_items_not_objects" / "manifest.json").write_text(json.dumps({**doc, "items": [1, 2]}))
    shutil.copytree(d / "ds", d / "ds_bad_json")
    (d / "ds_bad_json" / "manifest.json").write_text("{not json")
    shutil.copytree(d / "ds", d / "ds_binary_json")
    (d / "ds_binary_json" / "manifest.json").write_bytes(b"\xff\xfe\x00garbage")
    (d / "empty_folder").mkdir()
    (d / "existing.csv").write_text("row,col\n1,2\n")
    (d / "existing.tif").write_bytes(raw)
    (d / "a_file").write_text("x")
    (d / "out_dir").mkdir()
    return d


def _snapshot(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            small = st.st_size < (1 << 24)  # the sparse "huge" files are compared by size and time only
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns,
                                             hashlib.sha256(p.read_bytes()).hexdigest() if small else None)
    return out


def run_case(files: Path, argv: list, capsys) -> tuple[int, str]:
    """Run one command; check the common outcome; return (status, stderr)."""
    argv = [a.replace("{d}", str(files)) for a in argv]
    before = _snapshot(files)
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse refusals
        rc = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert rc in (0, 2), (argv, rc, err)
    if rc == 2:
        lines = [ln for ln in err.strip().splitlines() if "it/s" not in ln and "%|" not in ln]
        assert lines and "error:" in lines[-1], err
        assert not any("error" in ln.lower() for ln in lines[:-1] if not ln.startswith(("usage:", " "))), err
    after = _snapshot(files)
    changed = [k for k in before if after.get(k) != before[k]]
    assert not changed, f"inputs or earlier outputs changed: {changed}"
    return rc, err


IMAGES_REFUSED = ["missing.tif", "empty.tif", "trunc_header.tif", "trunc_ifd.tif", "trunc_half.tif", "text.tif",
                  "wrongext.tif", "empty.png", "trunc8.png", "trunc_half.png", "text.png", "image.bmp", "1d.tif",
                  "1x1.tif", "2x2.tif", "6d.tif", "complex64.tif", "nan.tif", "inf.tif", "allnan.tif", "empty_folder"]
IMAGES_COUNTED = ["ok.tif", "ok.png", "thin.tif", "elongated.tif", "stack.tif", "4d.tif", "5d.tif",
                  "rgb.tif", "rgba.tif", "const.tif", "zeros.tif", "int8.tif", "uint16.tif", "int16.tif",
                  "int32.tif", "uint32.tif", "float16.tif", "float32.tif", "float64.tif", "bool.tif", "int64.tif",
                  "uint64.tif"]


@pytest.mark.parametrize("name", IMAGES_REFUSED)
def test_count_refuses_unreadable_or_meaningless_images(files, capsys, name):
    rc, err = run_case(files, ["count", "{d}/" + name, "--model", "classic", "--diameter", "8", "--quiet"], capsys)
    assert rc == 2, err


@pytest.mark.parametrize("name", IMAGES_COUNTED)
def test_count_counts_every_readable_shape_and_dtype(files, capsys, name):
    rc, err = run_case(files, ["count", "{d}/" + name, "--model", "classic", "--diameter", "8", "--quiet", "--json"],
                       capsys)
    assert rc == 0, err


@pytest.mark.parametrize("name", ["ok.tif", "stack.tif", "rgb.tif", "elongated.tif"])
def test_default_counter_counts_odd_shapes(files, capsys, name, one_torch_thread):
    rc, err = run_case(files, ["count", "{d}/" + name, "--quiet", "--diameter", "8"], capsys)
    assert rc == 0, err


COUNT_OPTIONS = [
    ["--diameter", "0"], ["--diameter", "-3"], ["--diameter", "nan"], ["--diameter", "inf"], ["--diameter", "1e-9"],
    ["--diameter", "1e9"], ["--diameter", "500"], ["--diameter", "big"],
    ["--tile", "0"], ["--tile", "-64"], ["--tile", "100"], ["--tile", "1048576"], ["--tile", "nan"],
    ["--overlap", "-1"], ["--overlap", "100000"], ["--batch-size", "0"], ["--batch-size", "1000000000"],
    ["--channel", "5"], ["--channel", "-9"], ["--device", "cuda:99"], ["--device", "tpu"],
]


@pytest.mark.parametrize("opt", COUNT_OPTIONS, ids=lambda o: " ".join(o))
def test_count_refuses_absurd_numbers(files, capsys, opt, one_torch_thread):
    model = [] if opt[0] in ("--batch-size", "--device", "--overlap") else ["--model", "classic"]
    base = ["count", "{d}/ok.tif", "--quiet", "--diameter", "8"] + model
    rc, err = run_case(files, base + opt, capsys)
    assert rc == 2, err


MODELS = ["m_huge", "m_list", "m_nokeys", "m_corrupt", "m_trunc", "m_shape", "m_zero_diameter", "m_nan_diameter",
          "m_bad_backbone", "m_pickle", "evil.pt", "garbage.pt", "garbage.safetensors", "no_such_model",
          "empty_folder"]


@pytest.mark.parametrize("model", MODELS)
def test_count_refuses_broken_model_files(files, capsys, model):
    rc, err = run_case(files, ["count", "{d}/ok.tif", "--model", "{d}/" + model, "--diameter", "8", "--quiet"],
                       capsys)
    assert rc == 2, err
    assert len(err.strip().splitlines()[-1]) < 400


@pytest.mark.parametrize("model", ["s_huge", "s_list", "s_zero_groups", "s_corrupt", "s_shape", "empty_folder", "no_such"])
def test_stain_refuses_broken_model_folders(files, capsys, model):
    rc, err = run_case(files, ["stain", "{d}/ok.tif", "--out", "{d}/stained.tif", "--model", "{d}/" + model,
                               "--steps", "2"], capsys)
    assert rc == 2, err
    assert not (files / "stained.tif").exists()


@pytest.mark.parametrize("dataset", ["ds_list", "ds_items_not_objects", "ds_bad_json", "ds_binary_json",
                                     "empty_folder", "missing", "ok.tif"])
def test_dataset_commands_refuse_broken_manifests(files, capsys, dataset):
    rc, err = run_case(files, ["evaluate-counter", "{d}/" + dataset, "--model", "classic", "--quiet"], capsys)
    assert rc == 2, err
    rc, err = run_case(files, ["train-counter", "{d}/" + dataset, "--out", "{d}/trained", "--epochs", "1",
                               "--backbone", "test_efficientnet", "--quiet"], capsys)
    assert rc == 2, err
    assert not (files / "trained").exists()


OUTPUTS = [
    ["--out", "{d}/existing.csv"],  # exists, no --overwrite
    ["--out", "{d}/out_dir", "--overwrite"],  # a folder
    ["--out", "{d}/out_dir"],
    ["--out", "{d}/a_file/points.csv"],  # under a regular file
    ["--out", "{d}/a_file/deeper/points.csv", "--overwrite"],
]


@pytest.mark.parametrize("opt", OUTPUTS, ids=lambda o: " ".join(o))
def test_count_output_paths(files, capsys, opt):
    rc, err = run_case(files, ["count", "{d}/ok.tif", "--model", "classic", "--diameter", "8", "--quiet"] + opt,
                       capsys)
    assert rc == 2, err
    assert (files / "out_dir").is_dir() and (files / "a_file").read_text() == "x"
    assert (files / "existing.csv").read_text() == "row,col\n1,2\n"


@pytest.mark.parametrize("cmd", [
    ["nsc", "{d}/ok.tif", "--out", "{d}/out_dir", "--overwrite"],
    ["nsc", "{d}/ok.tif", "--out", "{d}/a_file/m.tif"],
    ["nsc", "{d}/ok.tif", "--out", "{d}/existing.tif"],
    ["stain", "{d}/ok.tif", "--out", "{d}/out_dir", "--overwrite"],
    ["stain", "{d}/ok.tif", "--out", "{d}/a_file/s.tif"],
    ["layouts", "--n", "1", "--out", "{d}/a_file/ds"],
    ["layouts", "--n", "1", "--out", "{d}/a_file"],
    ["simulate-stain-pairs", "--n", "1", "--out", "{d}/a_file"],
    ["train-counter", "{d}/ds", "--out", "{d}/a_file", "--epochs", "1", "--backbone", "test_efficientnet"],
], ids=lambda c: " ".join(c[:1] + c[-2:]))
def test_other_commands_refuse_output_paths_they_cannot_use(files, capsys, cmd):
    rc, err = run_case(files, cmd, capsys)
    assert rc == 2, err


LAYOUT_OPTIONS = [
    ["--n", "0"], ["--n", "-1"], ["--size", "0", "0"], ["--size", "1", "1"], ["--size", "1000000", "1000000"],
    ["--cell-size", "0"], ["--cell-size", "-4"], ["--cell-size", "inf"], ["--cell-size", "nan"],
    ["--cell-size", "1e6"], ["--count-mean", "nan"], ["--count-std", "-1"], ["--max-overlap", "2"],
    ["--blur-sigma", "-1"], ["--noise-std", "inf"], ["--intensity", "1", "0"], ["--clusters", "5", "1"],
]


@pytest.mark.parametrize("opt", LAYOUT_OPTIONS, ids=lambda o: " ".join(o))
def test_layouts_refuses_absurd_numbers(files, capsys, opt):
    out = files / "layout_out"
    rc, err = run_case(files, ["layouts", "--n", "1", "--size", "32", "32", "--out", str(out)] + opt, capsys)
    assert rc == 2, err
    assert not out.exists() or not any(out.rglob("*.tif"))
    shutil.rmtree(out, ignore_errors=True)


TRAIN_OPTIONS = [
    ["--crop", "0"], ["--crop", "4096"], ["--crop", "1048576"], ["--epochs", "-1"], ["--lr", "nan"],
    ["--lr", "-1"], ["--batch-size", "0"], ["--batch-size", "100000"], ["--val-fraction", "1.5"],
    ["--cutmix-p", "2"], ["--diameter", "1e-9"], ["--diameter", "0"], ["--steps-per-epoch", "-3"],
]


@pytest.mark.parametrize("opt", TRAIN_OPTIONS, ids=lambda o: " ".join(o))
def test_train_counter_refuses_absurd_numbers(files, capsys, opt, one_torch_thread):
    out = files / "train_out"
    rc, err = run_case(files, ["train-counter", "{d}/ds", "--out", str(out), "--epochs", "1", "--steps-per-epoch",
                               "1", "--batch-size", "2", "--crop", "64", "--backbone", "test_efficientnet",
                               "--quiet"] + opt, capsys)
    assert rc == 2, err
    assert not (out / "model.safetensors").exists()
    shutil.rmtree(out, ignore_errors=True)


STAIN_OPTIONS = [["--steps", "0"], ["--steps", "-5"], ["--steps", "100000000"], ["--strength", "2"],
                 ["--strength", "nan"], ["--refine", "-1"]]


@pytest.mark.parametrize("opt", STAIN_OPTIONS, ids=lambda o: " ".join(o))
def test_stain_refuses_absurd_numbers(files, capsys, opt):
    rc, err = run_case(files, ["stain", "{d}/ok.tif", "--out", "{d}/stain_out.tif"] + opt, capsys)
    assert rc == 2, err
    assert not (files / "stain_out.tif").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_folder_is_an_error_line(files, capsys):
    ro = files / "read_only"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o500)
    try:
        rc, err = run_case(files, ["count", "{d}/ok.tif", "--model", "classic", "--diameter", "8", "--quiet",
                                   "--out", str(ro / "p.csv")], capsys)
        assert rc == 2, err
    finally:
        ro.chmod(0o700)
