"""Outputs are written and removed only inside the output folder, under names the product made."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cellsynth import io
from cellsynth.cli import main
from cellsynth.layouts import LayoutParams, export_dataset

P = LayoutParams(shape=(32, 32), count_mean=4, count_std=1)


def test_overwrite_never_removes_paths_a_foreign_manifest_lists(tmp_path, capsys):
    out = tmp_path / "r1" / "out"
    out.mkdir(parents=True)
    victim = tmp_path / "r1" / "victim.txt"
    victim.write_text("x")
    outside = tmp_path / "abs.txt"
    outside.write_text("y")
    doc = {"items": [{"image": "../victim.txt", "labels": str(outside), "centres": "y"}]}
    (out / "manifest.json").write_text(json.dumps(doc))
    rc = main(["layouts", "--n", "1", "--size", "32", "32", "--out", str(out), "--overwrite"])
    assert rc == 2 and "not a layout dataset manifest" in capsys.readouterr().err
    assert victim.read_text() == "x" and outside.read_text() == "y"


def test_overwrite_refuses_our_format_with_paths_outside_the_folder(tmp_path):
    export_dataset(tmp_path / "ds", 1, params=P, seed=0)
    victim = tmp_path / "victim.txt"
    victim.write_text("x")
    doc = io.read_json(tmp_path / "ds" / "manifest.json")
    doc["items"][0]["image"] = "../victim.txt"
    io.write_json(tmp_path / "ds" / "manifest.json", doc, overwrite=True)
    with pytest.raises(ValueError, match="victim.txt"):
        export_dataset(tmp_path / "ds", 1, params=P, seed=5, overwrite=True)
    with pytest.raises(ValueError, match="victim.txt"):
        export_dataset(tmp_path / "ds", 1, params=P, seed=0)  # resume reads the items too
    assert victim.read_text() == "x"


def test_smaller_n_completes_and_leaves_no_orphans(tmp_path):
    export_dataset(tmp_path / "ds", 3, params=P, seed=0)
    export_dataset(tmp_path / "ds", 2, params=P, seed=0)
    doc = io.read_json(tmp_path / "ds" / "manifest.json")
    assert doc["complete"] and doc["n"] == 2 and len(doc["items"]) == 2
    for sub in ("images", "labels", "centres"):
        assert len(list((tmp_path / "ds" / sub).iterdir())) == 2


def test_overwrite_leaves_no_stale_files_but_keeps_foreign_ones(tmp_path):
    export_dataset(tmp_path / "ds", 3, params=P, seed=0)
    doc = io.read_json(tmp_path / "ds" / "manifest.json")
    doc["items"], doc["complete"] = doc["items"][:2], False  # killed after writing item 2's files
    io.write_json(tmp_path / "ds" / "manifest.json", doc, overwrite=True)
    (tmp_path / "ds" / "images" / "mine.txt").write_text("keep")
    export_dataset(tmp_path / "ds", 1, params=P, seed=1, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "ds" / "images").iterdir()) == ["layout_0000.tif", "mine.txt"]
    assert len(list((tmp_path / "ds" / "labels").iterdir())) == 1


def test_a_missing_item_is_regenerated_in_place(tmp_path):
    export_dataset(tmp_path / "ds", 3, params=P, seed=0)
    before = (tmp_path / "ds" / "images" / "layout_0002.tif").read_bytes()
    (tmp_path / "ds" / "labels" / "layout_0001.tif").unlink()
    export_dataset(tmp_path / "ds", 3, params=P, seed=0)
    doc = io.read_json(tmp_path / "ds" / "manifest.json")
    assert [it["image"] for it in doc["items"]] == [f"images/layout_{i:04d}.tif" for i in range(3)]
    assert (tmp_path / "ds" / "labels" / "layout_0001.tif").is_file()
    assert (tmp_path / "ds" / "images" / "layout_0002.tif").read_bytes() == before


def test_a_rerun_removes_its_own_stale_part_files(tmp_path):
    export_dataset(tmp_path / "ds", 1, params=P, seed=0)
    stale = [tmp_path / "ds" / ".manifest.json.abcd1234.part", tmp_path / "ds" / "images" / ".layout_0000.tif.x_y_z123.part"]
    for p in stale:
        p.write_text("partial")
    foreign = tmp_path / "ds" / ".notes.txt.abcd1234.part"
    foreign.write_text("not ours")
    export_dataset(tmp_path / "ds", 2, params=P, seed=0)
    assert not any(p.exists() for p in stale)
    assert foreign.exists()


def test_remove_stale_parts_only_removes_temporary_files_of_the_given_names(tmp_path):
    (tmp_path / ".a.tif.12345678.part").write_text("")
    (tmp_path / ".b.tif.12345678.part").write_text("")
    (tmp_path / "a.tif").write_text("final")
    removed = io.remove_stale_parts(tmp_path, names=["a.tif"])
    assert [p.name for p in removed] == [".a.tif.12345678.part"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.tif.12345678.part", "a.tif"]


def test_interrupt_while_a_write_is_set_up_leaves_no_temporary_file(tmp_path, monkeypatch):
    real_open = os.open

    def open_then_interrupt(*args, **kwargs):
        fd = real_open(*args, **kwargs)  # the temporary file exists, then Ctrl-C arrives
        os.close(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(io.os, "open", open_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_path(tmp_path / "a.tif"):
            pass
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_interrupt_inside_a_writes_cleanup_is_swept_up_by_remove_unfinished(tmp_path, monkeypatch):
    import pathlib

    real_unlink = pathlib.Path.unlink
    calls = []

    def unlink_interrupted_once(self, missing_ok=False):
        if not calls:
            calls.append(self)
            raise KeyboardInterrupt  # arrives as the write's ``finally`` starts
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(pathlib.Path, "unlink", unlink_interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_path(tmp_path / "a.tif") as tmp:
            raise RuntimeError("the write failed")
    assert [p.name for p in tmp_path.iterdir()] == [tmp.name]  # left behind by the interrupt
    assert io.remove_unfinished() == [tmp]
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    assert io.remove_unfinished() == []  # forgotten once removed


def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    out = tmp_path / "ds"
    code = ("import sys; from cellsynth.cli import main; "
            f"sys.exit(main(['layouts', '--n', '100000', '--size', '64', '64', '--out', {str(out)!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / "images").is_dir() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert err.strip().splitlines()[-1].startswith("error: terminated")
    assert not list(out.rglob("*.part"))
    doc = io.read_json(out / "manifest.json")
    assert not doc["complete"] and all((out / it["image"]).is_file() for it in doc["items"])


def test_write_json_refuses_nan_and_infinity(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        io.write_json(tmp_path / "a.json", {"loss": float("nan")})
    with pytest.raises(ValueError, match="NaN"):
        io.write_json(tmp_path / "b.json", {"x": np.float32("inf")})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flag", ["--noise-std", "--cluster-spread", "--count-mean", "--cell-size"])
def test_infinite_layout_options_are_refused(tmp_path, capsys, flag):
    rc = main(["layouts", "--n", "1", "--size", "32", "32", "--out", str(tmp_path / "d"), flag, "inf"])
    assert rc == 2
    err = capsys.readouterr().err
    assert flag[2:].replace("-", "_") in err and "finite" in err
    assert not (tmp_path / "d").exists()


def test_errors_name_cli_flags_not_library_arguments(tmp_path, capsys):
    export_dataset(tmp_path / "ds", 1, params=P, seed=0)
    assert main(["layouts", "--n", "1", "--size", "32", "32", "--out", str(tmp_path / "ds"), "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err


# ----------------------------------------------------------------------------- simulated staining pairs

def _cancel_after(k):
    from cellsynth.progress import Cancelled

    def callback(p):
        if p.step >= k:
            raise Cancelled()
    return callback


def test_simulate_stain_pairs_resumes_and_matches_an_uninterrupted_run(tmp_path):
    from cellsynth.progress import Cancelled
    from cellsynth.stain.simulate import simulate_stain_pairs

    with pytest.raises(Cancelled):
        simulate_stain_pairs(tmp_path / "a", 4, seed=2, shape=(32, 32), progress=_cancel_after(2))
    assert io.read_json(tmp_path / "a" / "stain_pairs.json")["complete"] is False
    steps = []
    simulate_stain_pairs(tmp_path / "a", 4, seed=2, shape=(32, 32), progress=lambda p: steps.append(p.step))
    assert steps == [2, 3, 4]
    assert io.read_json(tmp_path / "a" / "stain_pairs.json")["complete"] is True
    simulate_stain_pairs(tmp_path / "b", 4, seed=2, shape=(32, 32))
    files = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.tif"))
    assert files == sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.tif"))
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_simulate_stain_pairs_smaller_n_and_overwrite_remove_only_their_own_files(tmp_path):
    from cellsynth.stain.simulate import simulate_stain_pairs

    root = simulate_stain_pairs(tmp_path / "a", 3, seed=0, shape=(32, 32))
    (root / "fov_0002" / "notes.txt").write_text("keep")
    (root / "fov_0001" / "brightfield" / ".0_z-1.tif.abcd1234.part").write_text("partial")
    simulate_stain_pairs(root, 2, seed=0, shape=(32, 32))
    assert sorted(p.name for p in root.iterdir()) == ["fov_0000", "fov_0001", "fov_0002", "provenance.json",
                                                     "stain_pairs.json"]
    assert [p.name for p in (root / "fov_0002").iterdir()] == ["notes.txt"]
    assert not list(root.rglob("*.part"))
    simulate_stain_pairs(root, 1, seed=1, shape=(32, 32), overwrite=True)
    assert not (root / "fov_0001").exists() and (root / "fov_0002" / "notes.txt").exists()
    assert io.read_json(root / "stain_pairs.json")["seed"] == 1


def test_simulate_stain_pairs_refuses_a_foreign_record_even_with_overwrite(tmp_path):
    from cellsynth.stain.simulate import simulate_stain_pairs

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "stain_pairs.json").write_text('{"n": 1}')
    with pytest.raises(FileExistsError, match="not a record of simulated pairs"):
        simulate_stain_pairs(tmp_path / "a", 1, shape=(32, 32), overwrite=True)


def test_an_incomplete_pairs_folder_is_refused_for_evaluation_and_training(tmp_path, capsys):
    from cellsynth.progress import Cancelled
    from cellsynth.stain.data import read_stain_dataset
    from cellsynth.stain.metrics import evaluate_stain
    from cellsynth.stain.simulate import simulate_stain_pairs

    with pytest.raises(Cancelled):
        simulate_stain_pairs(tmp_path / "a", 5, shape=(32, 32), progress=_cancel_after(2))
    with pytest.raises(ValueError, match="2 of 5"):
        read_stain_dataset(tmp_path / "a")
    with pytest.raises(ValueError, match="2 of 5"):
        evaluate_stain(tmp_path / "a", None)
    assert main(["simulate-stain-pairs", "--n", "5", "--size", "32", "32", "--out", str(tmp_path / "a")]) == 0
    assert len(read_stain_dataset(tmp_path / "a")) == 5


def test_evaluate_stain_refuses_a_zero_limit(tmp_path):
    from cellsynth.stain.metrics import evaluate_stain
    from cellsynth.stain.simulate import simulate_stain_pairs

    root = simulate_stain_pairs(tmp_path / "a", 1, shape=(32, 32))
    for limit in (0, -1):
        with pytest.raises(ValueError, match="limit"):
            evaluate_stain(root, None, limit=limit)


# ----------------------------------------------------------------------------- staining: no NaN in, no NaN out

TINY_STAIN = {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 4,
              "dropout": 0.0, "num_train_timesteps": 20}


def _stain_cfg(**kw):
    from cellsynth.stain.train import TrainConfig

    base = dict(epochs=1, steps_per_epoch=1, batch_size=2, crop=16, device="cpu", ema_decay=0.0, model=TINY_STAIN)
    return TrainConfig(**{**base, **kw})


def test_a_nan_pixel_in_staining_data_is_refused_before_training(tmp_path, one_torch_thread):
    from cellsynth.stain.simulate import simulate_stain_pairs
    from cellsynth.stain.train import train_stain

    root = simulate_stain_pairs(tmp_path / "pairs", 1, shape=(32, 32))
    bad = root / "fov_0000" / "fluorescence" / "1_ER.tif"
    data = io.read_tiff(bad)[0].astype(np.float32)
    data[3, 4] = np.nan
    io.write_tiff(bad, data, overwrite=True)
    with pytest.raises(ValueError, match="1_ER.tif.*NaN"):
        train_stain(root, tmp_path / "m", config=_stain_cfg())
    assert not (tmp_path / "m").exists()


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_model(tmp_path, monkeypatch, one_torch_thread):
    import torch

    from cellsynth.stain.simulate import simulate_stain_pairs
    from cellsynth.stain.train import train_stain

    root = simulate_stain_pairs(tmp_path / "pairs", 1, shape=(32, 32))
    train_stain(root, tmp_path / "m", config=_stain_cfg())
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    mse = torch.nn.functional.mse_loss
    monkeypatch.setattr(torch.nn.functional, "mse_loss", lambda a, b: mse(a, b) * float("nan"))
    with pytest.raises(ValueError, match="loss is nan"):
        train_stain(root, tmp_path / "m", config=_stain_cfg(epochs=2), resume=True)
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert io.read_json(tmp_path / "m" / "checkpoint" / "state.json")["epoch"] == 1


def _tiny_stain_model():
    from cellsynth.stain.model import StainModelConfig, build_unet

    cfg = StainModelConfig(sample_size=16, **{k: v for k, v in TINY_STAIN.items()})
    return build_unet(cfg), cfg


def test_a_non_finite_model_is_never_saved_nor_loaded(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from cellsynth.stain.model import save_stain_model
    from cellsynth.stain.pipeline_stain import load_stain_model

    unet, cfg = _tiny_stain_model()
    save_stain_model(unet, cfg, tmp_path / "good")
    with torch.no_grad():
        next(unet.parameters())[0].fill_(float("nan"))
    with pytest.raises(ValueError, match="not finite"):
        save_stain_model(unet, cfg, tmp_path / "bad")
    assert not (tmp_path / "bad" / "model.safetensors").exists()
    state = load_file(str(tmp_path / "good" / "model.safetensors"))
    name = next(iter(state))
    state[name] = state[name] * float("nan")
    save_file(state, str(tmp_path / "good" / "model.safetensors"))
    with pytest.raises(ValueError, match=f"not finite.*{name}"):
        load_stain_model(tmp_path / "good", device="cpu")


def test_a_model_config_with_non_finite_normalisation_is_refused():
    from cellsynth.stain.model import StainModelConfig

    norm = {"low": [0.0], "high": [float("nan")], "mean": [0.0], "std": [1.0]}
    with pytest.raises(ValueError, match="condition_norm must hold finite numbers"):
        StainModelConfig(brightfield_names=["z0"], condition_norm=norm)


def test_stain_output_with_nan_is_refused(one_torch_thread):
    import torch

    from cellsynth.stain import StainParams
    from cellsynth.stain.pipeline_stain import StainPipeline

    unet, cfg = _tiny_stain_model()
    with torch.no_grad():
        for p in unet.parameters():
            p.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        StainPipeline(unet, cfg)(np.random.default_rng(0).random((3, 16, 16)), params=StainParams(steps=1))


def test_stain_refuses_a_brightfield_outside_the_models_intensity_range(tmp_path, monkeypatch, capsys):
    from cellsynth.stain.pipeline_stain import load_stain_model

    pipe = load_stain_model("default", device="cpu")
    low = pipe.config.condition_norm["low"]
    bf = np.full((3, 16, 16), 255, np.uint8)  # an 8-bit image; the model knows 16-bit intensities
    bf[:, :8] = 0
    assert max(low) > 255
    with pytest.raises(ValueError, match="this model expects brightfield 16-bit .*this image is 8-bit"):
        pipe(bf)


def test_nsc_and_stain_check_the_output_before_computing(tmp_path, monkeypatch, capsys):
    import cellsynth.stain.pipeline_stain as model
    import cellsynth.stain.nsc as nsc

    def never(*args, **kw):
        raise AssertionError("computed before checking the output")

    monkeypatch.setattr(nsc, "nsc_masks", never)
    monkeypatch.setattr(model, "load_stain_model", never)
    io.write_tiff(tmp_path / "in.tif", np.zeros((3, 16, 16), np.uint16))
    (tmp_path / "out.tif").write_text("keep")
    stale = tmp_path / ".out.tif.abcd1234.part"
    stale.write_text("partial")
    for cmd in ("nsc", "stain"):
        assert main([cmd, str(tmp_path / "in.tif"), "--out", str(tmp_path / "out.tif")]) == 2
        assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "out.tif").read_text() == "keep" and not stale.exists()


def _rgb_tiff(path, alpha=False):
    import tifffile

    rgb = np.zeros((48, 48, 4 if alpha else 3), np.uint8)
    rgb[12:36, 12:36, :3] = (200, 150, 100)
    if alpha:
        rgb[..., 3] = 255
        tifffile.imwrite(path, rgb, photometric="rgb", extrasamples=["unassalpha"])
    else:
        tifffile.imwrite(path, rgb, photometric="rgb")


@pytest.mark.parametrize("alpha", [False, True])
def test_nsc_reads_rgb_tiffs_as_colour(tmp_path, capsys, alpha):
    _rgb_tiff(tmp_path / "rgb.tif", alpha)
    rc = main(["nsc", str(tmp_path / "rgb.tif"), "--out", str(tmp_path / "m.tif"), "--k", "2", "--r", "2",
               "--fov", "48"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "colour" in captured.out + captured.err
    mask = io.read_tiff(tmp_path / "m.tif")[0]
    assert mask.shape == (48, 48)
    assert mask[24, 24] == 1 and mask[2, 2] == 0


def test_nsc_of_an_all_zero_image_has_no_foreground():
    from cellsynth.stain import NSCParams, nsc_masks

    res = nsc_masks(np.zeros((64, 64)), params=NSCParams(k=5, r=5, fov=32))
    assert not res.foreground.any() and np.all(res.labels == 1)


def _little_memory(monkeypatch, available):
    import psutil

    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=available))


def test_a_tiff_larger_than_free_memory_is_refused_before_reading(tmp_path, monkeypatch):
    io.write_tiff(tmp_path / "a.tif", np.zeros((200, 300), np.uint16))
    _little_memory(monkeypatch, 50_000)
    with pytest.raises(ValueError, match=r"\(200, 300\) uint16.*120 kB.*free"):
        io.read_tiff(tmp_path / "a.tif")


def test_nsc_refuses_an_image_that_would_not_fit_in_memory(monkeypatch):
    from cellsynth.stain import NSCParams, nsc_masks

    _little_memory(monkeypatch, 1_000_000)
    with pytest.raises(ValueError, match="crop"):
        nsc_masks(np.random.default_rng(0).random((256, 256)), params=NSCParams(k=2, r=2, fov=64))


# ----------------------------------------------------------------------------- stylization

def _tiny_token(folder):
    from cellsynth.stylize.mapper import StyleMapper
    from cellsynth.stylize.tokens import StyleToken, save_token

    return save_token(StyleToken(StyleMapper(8, heads=2, dim_head=4)), folder)


def test_a_token_without_mapper_settings_or_with_nan_weights_is_refused(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from cellsynth.stylize.mapper import StyleMapper
    from cellsynth.stylize.tokens import StyleToken, load_token, save_token

    folder = _tiny_token(tmp_path / "tok")
    doc = io.read_json(folder / "token.json")
    del doc["mapper"]
    io.write_json(folder / "token.json", doc, overwrite=True)
    with pytest.raises(ValueError, match="heads"):
        load_token(folder)
    folder = _tiny_token(tmp_path / "tok2")
    state = load_file(str(folder / "mapper.safetensors"))
    name = sorted(state)[0]
    state[name] = state[name] * float("nan")
    save_file(state, str(folder / "mapper.safetensors"))
    with pytest.raises(ValueError, match="not finite"):
        load_token(folder)
    mapper = StyleMapper(8, heads=2, dim_head=4)
    with torch.no_grad():
        next(mapper.parameters()).fill_(float("inf"))
    with pytest.raises(ValueError, match="not finite"):
        save_token(StyleToken(mapper), tmp_path / "tok3")
    assert not (tmp_path / "tok3" / "mapper.safetensors").exists()


def test_a_misspelt_qc_model_is_an_error_not_the_classic_counter(tmp_path):
    from cellsynth.stylize.dataset import qc_counter

    with pytest.raises((FileNotFoundError, ValueError), match="clasic"):
        qc_counter("clasic")
    assert qc_counter("classic").name == "classic"


@pytest.mark.parametrize("content", [np.zeros((16, 16), np.float64), np.zeros((16, 16), np.int16),
                                     np.zeros((16, 16, 5), np.uint8)])
def test_stylize_checks_content_before_loading_the_model(tmp_path, monkeypatch, capsys, content):
    import cellsynth.stylize.loading as loading

    def never(*args, **kw):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(loading, "load_pipeline", never)
    np.save(tmp_path / "c.npy", content)
    import tifffile

    tifffile.imwrite(tmp_path / "c.tif", content)
    io.write_tiff(tmp_path / "s.tif", np.zeros((16, 16), np.uint8))
    rc = main(["stylize", str(tmp_path / "c.tif"), "--style", str(tmp_path / "s.tif"), "--token",
               str(_tiny_token(tmp_path / "tok")), "--out", str(tmp_path / "o.tif")])
    assert rc == 2
    assert "content" in capsys.readouterr().err


def _fake_pipe(image, style, token, params=None):
    from types import SimpleNamespace

    return SimpleNamespace(image=image)


def test_stylize_dataset_overwrite_removes_only_its_own_files(tmp_path):
    from cellsynth.stylize.dataset import stylize_dataset
    from cellsynth.stylize.tokens import load_token

    src = export_dataset(tmp_path / "src", 3, params=P, seed=0).parent
    token = load_token(_tiny_token(tmp_path / "tok"))
    style = np.zeros((8, 8), np.uint8)
    out = tmp_path / "out"
    kw = dict(pipe=_fake_pipe, token=token, style=style, qc_model="classic")
    stylize_dataset(src, out, **kw)
    (out / "images" / "mine.txt").write_text("keep")
    stylize_dataset(src, out, tolerance=0.5, overwrite=True, limit=1, **kw)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["mine.txt", "stylized_0000.tif"]
    assert io.read_json(out / "manifest.json")["complete"]
    stylize_dataset(src, out, tolerance=0.5, limit=1, **kw)  # same settings: nothing to do, still complete
    assert io.read_json(out / "manifest.json")["complete"]


def test_stylize_dataset_refuses_a_foreign_manifest_even_with_overwrite(tmp_path):
    from cellsynth.stylize.dataset import stylize_dataset
    from cellsynth.stylize.tokens import load_token

    src = export_dataset(tmp_path / "src", 1, params=P, seed=0).parent
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / "photo.tif").write_text("precious")
    (out / "manifest.json").write_text('{"items": []}')
    with pytest.raises(FileExistsError, match="not a stylized dataset"):
        stylize_dataset(src, out, pipe=_fake_pipe, token=load_token(_tiny_token(tmp_path / "tok")),
                        style=np.zeros((8, 8), np.uint8), qc_model="classic", overwrite=True)
    assert (out / "images" / "photo.tif").read_text() == "precious"


def test_a_dino_weights_folder_holding_other_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import Dinov2Config, Dinov2Model

    from cellsynth.stain.features import make_backbone

    cfg = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=28, patch_size=14)
    Dinov2Model(cfg).save_pretrained(tmp_path, safe_serialization=True)
    assert make_backbone("dinov2-small", weights=tmp_path, device="cpu").patch_size == 14
    state = load_file(str(tmp_path / "model.safetensors"))
    save_file({"other." + k: v for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="does not hold weights of this backbone"):
        make_backbone("dinov2-small", weights=tmp_path, device="cpu")


def test_train_stain_and_save_token_remove_their_stale_part_files(tmp_path, one_torch_thread):
    from cellsynth.stain.simulate import simulate_stain_pairs
    from cellsynth.stain.train import train_stain

    root = simulate_stain_pairs(tmp_path / "pairs", 1, shape=(32, 32))
    stale = [tmp_path / "m" / ".model.safetensors.abcd1234.part", tmp_path / "m" / "checkpoint" / ".state.json.abcd1234.part",
             tmp_path / "tok" / ".mapper.safetensors.abcd1234.part"]
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("partial")
    train_stain(root, tmp_path / "m", config=_stain_cfg())
    _tiny_token(tmp_path / "tok")
    assert not any(p.exists() for p in stale)


@pytest.mark.parametrize("command", ["adapt-counter", "retrain-counter"])
def test_overwrite_of_a_counter_folder_never_removes_the_users_files(tmp_path, capsys, command):
    img = tmp_path / "img.tif"
    io.write_tiff(img, np.zeros((32, 32), np.uint8))
    out = tmp_path / "model"
    out.mkdir()
    (out / "thesis.docx").write_bytes(b"years of work")
    (out / "config.json").write_text("{}")
    args = [command, str(img)]
    if command == "retrain-counter":
        pts = tmp_path / "p.csv"
        pts.write_text("row,col\n5,5\n")
        args.append(str(pts))
    rc = main(args + ["--out", str(out), "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "thesis.docx" in err and len(err.strip().splitlines()) == 1
    assert (out / "thesis.docx").read_bytes() == b"years of work" and (out / "config.json").read_text() == "{}"


def test_overwrite_replaces_a_folder_holding_only_a_counter(tmp_path):
    from cellsynth.adapt._output import COUNTER_FILES, check_out

    for name in COUNTER_FILES:
        (tmp_path / name).write_text("x")
    assert check_out(tmp_path, overwrite=True) == tmp_path
    with pytest.raises(FileExistsError, match="not empty"):
        check_out(tmp_path, overwrite=False)


def test_count_batch_stopped_by_sigterm_keeps_what_was_counted_and_resumes(tmp_path):
    """SIGTERM after some images of a count-batch: nothing half-written, and a re-run counts only the rest."""
    from skimage.draw import disk

    import tifffile

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        img = np.full((160, 160), 10, np.uint8)
        for c in rng.uniform(10, 150, (6, 2)):
            img[disk(tuple(c), 5, shape=img.shape)] = 200
        tifffile.imwrite(folder / f"img{i:02d}.tif", img)
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "cellsynth.cli", "count-batch", str(folder), "--out", str(out), "--model", "classic",
           "--diameter", "10", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    records = out / ".records"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(records.glob("*.json"))) < 3:
        time.sleep(0.05)
    assert proc.poll() is None, "the batch ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    assert not list(out.rglob("*.part")), "unfinished temporary files left behind"
    done = {p.name for p in records.glob("*.json")}
    assert 0 < len(done) < 24
    for p in records.glob("*.json"):
        json.loads(p.read_text())  # every record is whole
    again = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    doc = json.loads(again.stdout)
    assert doc["skipped"] == len(done) and doc["counted"] == 24 - len(done)
    with open(out / "counts.csv", newline="") as fh:
        assert len(fh.read().strip().splitlines()) == 1 + 24
