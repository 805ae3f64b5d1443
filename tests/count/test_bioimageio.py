"""Counters as bioimage.io packages: bioimageio's own validation and test pass offline, and the
package loads back (library and CLI) into a counter that counts exactly as the original."""

import json
import shutil
import zipfile

import numpy as np
import pytest

pytest.importorskip("bioimageio.core")

from cellsynth.count import count_cells  # noqa: E402
from cellsynth.count.bioimageio import export_counter, is_counter_package, load_package_counter  # noqa: E402
from cellsynth.count.models import counter_config, load_counter, new_counter, save_counter  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import torch

    from cellsynth.io import read_tiff
    from cellsynth.weights import resources_dir

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("counter") / "tiny"
    cfg = counter_config("density", backbone="test_efficientnet", blocks=3, diameter=12.0,
                         training={"data": "seeded synthetic nuclei (test)", "config": {"strategy": "supervised",
                                                                                        "epochs": 1, "lr": 1e-3}})
    counter = new_counter(cfg, device="cpu")
    save_counter(counter.net, cfg, folder)
    img, _ = read_tiff(resources_dir() / "samples" / "neurocyte_010.tif")
    crop = np.asarray(img)[150:214, 200:264]
    out = folder.parent / "tiny.zip"
    res = export_counter(folder, out, test_image=crop, authors=["Test Lab"])
    return folder, out, res, crop


def test_bioimageio_validation_and_test_pass_offline(exported):
    from bioimageio.spec import InvalidDescr, load_description

    folder, out, res, _ = exported
    assert out.is_file() and res.path == out
    assert res.weight_formats == ["pytorch_state_dict", "torchscript"], res.notes
    # export ran bioimageio.core's own test (inference on the test input vs the counter's output,
    # then every weight format at several sizes and batch sizes) on the package before writing it
    assert res.test["status"] == "passed"
    names = [d["name"] for d in res.test["details"]]
    assert any("Reproduce test outputs" in n and "pytorch_state_dict" in n for n in names)
    assert any("Reproduce test outputs" in n and "torchscript" in n for n in names)
    assert all(d["status"] == "passed" for d in res.test["details"])
    descr = load_description(out)
    assert not isinstance(descr, InvalidDescr)
    assert "12 px" in descr.description  # the diameter the model expects
    cfg = descr.config.model_dump()["cellsynth"]
    assert cfg["kind"] == "density" and cfg["diameter"] == 12.0
    assert cfg["training"]["data"] == "seeded synthetic nuclei (test)"  # provenance kept
    pre = [p.id for p in descr.inputs[0].preprocessing]
    assert "scale_range" in pre and "clip" in pre
    assert "scale_linear" in [p.id for p in descr.outputs[0].postprocessing]


def test_package_prediction_is_the_counters_density(exported):
    """bioimageio.core's prediction pipeline on the package gives the counter's density in cells per pixel.

    Without halo padding it is the same computation; with the halo padding consumers apply by default
    the squeeze-excitation blocks see a slightly larger field, so the count moves a little.
    """
    import torch
    from bioimageio.core import create_prediction_pipeline, predict
    from bioimageio.core.digest_spec import create_sample_for_model
    from bioimageio.spec import load_description

    from cellsynth.count.preprocess import normalize_image

    folder, out, _, crop = exported
    descr = load_description(out)
    x = crop.astype(np.float32)[None, None]
    counter = load_counter(folder, device="cpu")
    with torch.no_grad():
        ours = counter.net(torch.from_numpy(normalize_image(crop))[None, None]).numpy()
    ours = ours / counter.config["density_scale"]
    with create_prediction_pipeline(descr) as pp:
        sample = create_sample_for_model(descr, inputs={"raw": x})
        exact = pp.predict_sample_without_blocking(sample, skip_input_padding=True, skip_output_cropping=True)
    density = np.asarray(exact.members["density"].data)
    assert density.shape == ours.shape == (1, 1, 64, 64)
    np.testing.assert_allclose(density, ours, rtol=1e-3, atol=1e-4 * float(ours.max()))
    padded = np.asarray(predict(model=descr, inputs={"raw": x}).members["density"].data)
    assert padded.shape == (1, 1, 64, 64)
    assert float(padded.sum()) == pytest.approx(float(ours.sum()), rel=0.1)


def test_package_round_trips_into_the_same_counter(exported):
    import torch

    folder, out, _, crop = exported
    a, b = load_counter(folder, device="cpu"), load_counter(out, device="cpu")
    assert b.kind == "density" and b.diameter == 12.0 and b.path == out
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ra = count_cells(crop, model=a, diameter=12.0, device="cpu")
    rb = count_cells(crop, model=str(out), diameter=12.0, device="cpu")
    assert ra.count == rb.count and np.allclose(ra.points, rb.points)
    assert is_counter_package(out) and not is_counter_package(folder / "config.json")


def test_cli_counts_with_a_package_and_refuses_bad_exports(exported, tmp_path, capsys):
    from cellsynth.cli import main
    from cellsynth.io import write_tiff

    folder, out, _, crop = exported
    img = tmp_path / "crop.tif"
    write_tiff(img, crop)
    assert main(["count", str(img), "--model", str(out), "--diameter", "12", "--json", "--quiet"]) == 0
    via_zip = json.loads(capsys.readouterr().out)["count"]
    assert main(["count", str(img), "--model", str(folder), "--diameter", "12", "--json", "--quiet"]) == 0
    assert via_zip == json.loads(capsys.readouterr().out)["count"]
    assert main(["export-counter", "classic", "--out", str(tmp_path / "c.zip")]) == 2
    assert "classic counter has no network weights" in capsys.readouterr().err
    assert main(["export-counter", str(folder), "--out", str(tmp_path / "c.tif")]) == 2
    assert "is a .zip file" in capsys.readouterr().err
    assert main(["export-counter", str(folder), "--out", str(out), "--no-check"]) == 2  # exists, not replaced
    assert "--overwrite" in capsys.readouterr().err
    assert not (tmp_path / "c.zip").exists()


def test_foreign_and_damaged_packages_are_refused(exported, tmp_path):
    _, out, _, _ = exported
    with zipfile.ZipFile(out) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    damaged = tmp_path / "damaged.zip"
    with zipfile.ZipFile(damaged, "w") as zf:
        for n, data in members.items():
            zf.writestr(n, data[:-8] + b"\0" * 8 if n == "weights.pt" else data)
    with pytest.raises(ValueError, match="do not match their sha256"):
        load_package_counter(damaged)
    foreign = tmp_path / "foreign.zip"
    with zipfile.ZipFile(foreign, "w") as zf:
        zf.writestr("rdf.yaml", "type: model\nformat_version: 0.5.3\nname: other\nconfig: {}\n")
    with pytest.raises(ValueError, match="not a counter exported by napari-cellsynth"):
        load_counter(foreign)
    not_zip = tmp_path / "x.zip"
    shutil.copyfile(__file__, not_zip)
    with pytest.raises(ValueError, match="not a zip file"):
        load_counter(not_zip)
