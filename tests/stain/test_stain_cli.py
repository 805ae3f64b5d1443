"""Command line: nsc, simulate-stain-pairs, train-stain, evaluate-stain, stain."""

import json

import numpy as np
import pytest

from cellsynth import io
from cellsynth.cli import main


def test_nsc_writes_a_mask(tmp_path, capsys):
    img = np.full((64, 64), 100, np.uint16)
    img[16:48, 16:48] = 2000
    io.write_tiff(tmp_path / "img.tif", img)
    assert main(["nsc", str(tmp_path / "img.tif"), "--out", str(tmp_path / "m.tif"), "--k", "2", "--r", "1",
                 "--fov", "64"]) == 0
    mask, _ = io.read_tiff(tmp_path / "m.tif")
    assert mask.dtype == np.uint8 and mask[32, 32] == 1 and mask[2, 2] == 0
    assert "filters" in capsys.readouterr().out
    # existing output refused; bad channel is an error line with status 2
    assert main(["nsc", str(tmp_path / "img.tif"), "--out", str(tmp_path / "m.tif")]) == 2
    stack = np.stack([img, img.T])
    io.write_tiff(tmp_path / "s.tif", stack)
    assert main(["nsc", str(tmp_path / "s.tif"), "--out", str(tmp_path / "x.tif"), "--channel", "5"]) == 2
    assert "--channel" in capsys.readouterr().err


def test_simulate_train_evaluate_and_stain(tmp_path, capsys):
    pytest.importorskip("torch")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = tmp_path / "pairs"
        assert main(["simulate-stain-pairs", "--n", "2", "--seed", "3", "--out", str(data), "--size", "32", "32"]) == 0
        assert len(list(data.glob("fov_*"))) == 2
        model = tmp_path / "model"
        assert main(["train-stain", str(data), "--out", str(model), "--epochs", "1", "--steps-per-epoch", "1",
                     "--batch-size", "2", "--crop", "16", "--block-out-channels", "8", "16", "--norm-num-groups", "8",
                     "--layers-per-block", "1", "--timesteps", "20", "--device", "cpu"]) == 0
        assert (model / "model.safetensors").is_file()
        capsys.readouterr()
        assert main(["evaluate-stain", str(data), "--model", str(model), "--steps", "2", "--guidance", "off",
                     "--json", "--device", "cpu"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert set(doc["average"]) == {"mse", "mae", "pcc", "ssim"}
        assert set(doc["channels"]) == {"DNA", "ER", "RNA", "AGP", "Mito"}
        assert main(["evaluate-stain", str(data), "--model", str(model), "--steps", "2", "--guidance", "off",
                     "--device", "cpu"]) == 0
        assert "average" in capsys.readouterr().out
        bf = sorted((data / "fov_0000" / "brightfield").glob("*.tif"))
        io.write_tiff(tmp_path / "bf.tif", np.stack([io.read_tiff(p)[0] for p in bf]))
        assert main(["stain", str(tmp_path / "bf.tif"), "--out", str(tmp_path / "v.tif"), "--model", str(model),
                     "--steps", "2", "--guidance", "off", "--device", "cpu"]) == 0
        v, _ = io.read_tiff(tmp_path / "v.tif")
        assert v.shape == (5, 32, 32) and v.dtype == np.float32
        assert main(["evaluate-stain", str(data), "--model", str(tmp_path / "nope"), "--json"]) == 2
        with pytest.raises(SystemExit):
            main(["evaluate-stain", str(data), "--guidance", "maybe"])
    finally:
        torch.set_num_threads(threads)
