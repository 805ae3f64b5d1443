"""The stylize command line on a tiny pipeline folder."""

import json

import numpy as np
import pytest
import torch

from cellsynth import io
from cellsynth.cli import main
from cellsynth.layouts import LayoutParams, export_dataset, read_dataset
from cellsynth.stylize import load_token, save_token
from cellsynth.stylize.tiny import save_tiny_pipeline, tiny_token


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli")
    model = save_tiny_pipeline(root / "tiny-sd", seed=0)
    token = save_token(tiny_token(0), root / "token")
    content = np.zeros((30, 40), np.uint8)
    content[5:15, 5:15] = 200
    io.write_tiff(root / "content.tif", content, pixel_size=0.65)
    io.write_tiff(root / "style.tif", (np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8))
    return root, model, token


def test_stylize_writes_a_tiff_and_json(files, capsys):
    root, model, token = files
    out = root / "out.tif"
    rc = main(["stylize", str(root / "content.tif"), "--style", str(root / "style.tif"), "--token", str(token),
               "--model", str(model), "--steps", "4", "--size", "32", "--device", "cpu", "--out", str(out), "--json"])
    assert rc == 0
    image, meta = io.read_tiff(out)
    assert image.shape == (30, 40) and image.dtype == np.uint8 and meta["pixel_size"] == pytest.approx(0.65)
    record = json.loads(capsys.readouterr().out)
    assert record["operation"] == "stylize.inst" and record["denoising_steps"] == 2
    # existing output refused
    rc = main(["stylize", str(root / "content.tif"), "--style", str(root / "style.tif"), "--token", str(token),
               "--model", str(model), "--out", str(out)])
    assert rc == 2 and "already exists" in capsys.readouterr().err


def test_missing_weights_offline_is_a_clear_error(files, capsys, tmp_path, monkeypatch):
    root, _, token = files
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    rc = main(["stylize", str(root / "content.tif"), "--style", str(root / "style.tif"), "--token", str(token),
               "--offline", "--out", str(tmp_path / "x.tif")])
    err = capsys.readouterr().err
    assert rc == 2 and "sd-v1-4" in err and "offline" in err


def test_train_style_then_import_token(files, capsys, tmp_path):
    root, model, _ = files
    out = tmp_path / "tok"
    rc = main(["train-style", str(root / "style.tif"), "--model", str(model), "--steps", "3", "--size", "32",
               "--checkpoint-every", "2", "--device", "cpu", "--out", str(out)])
    assert rc == 0 and "final loss" in capsys.readouterr().out
    token = load_token(out)
    assert token.training["steps"] == 3 and (out / "checkpoint" / "state.json").is_file()
    # an official file with a payload is refused
    import os

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"string_to_token": {"*": torch.tensor(265)}, "attention": Payload()}, tmp_path / "evil.pt")
    rc = main(["import-token", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "t2")])
    assert rc == 2 and "refusing" in capsys.readouterr().err and not (tmp_path / "t2").exists()


def test_stylize_dataset_command(files, capsys, tmp_path):
    root, model, token = files
    export_dataset(tmp_path / "lay", 2, params=LayoutParams(shape=(32, 32), count_mean=5, count_std=0, count_min=2,
                                                            count_max=8, cell_size=8.0), seed=0)
    rc = main(["stylize-dataset", str(tmp_path / "lay"), "--style", str(root / "style.tif"), "--token", str(token),
               "--model", str(model), "--steps", "2", "--size", "32", "--device", "cpu", "--qc-model", "classic",
               "--tolerance", "5", "--out", str(tmp_path / "syn")])
    assert rc == 0 and "2 kept" in capsys.readouterr().out
    assert len(read_dataset(tmp_path / "syn")) == 2


def test_load_pipeline_caches_and_refuses_non_pipelines(files, tmp_path):
    from cellsynth.stylize import InSTPipeline, load_pipeline
    from cellsynth.stylize.loading import clear_cache, model_record

    _, model, _ = files
    a = load_pipeline(model, device="cpu")
    assert isinstance(a, InSTPipeline) and load_pipeline(model, device="cpu") is a
    assert a.scheduler.config.steps_offset == 1 and a.scheduler.config.set_alpha_to_one is False
    clear_cache()
    assert load_pipeline(model, device="cpu") is not a
    with pytest.raises(ValueError, match="model_index.json"):
        load_pipeline(tmp_path, device="cpu", image_encoder=str(model / "image_encoder"))
    assert model_record("sd-v1-4")["repo_id"] == "CompVis/stable-diffusion-v1-4"
