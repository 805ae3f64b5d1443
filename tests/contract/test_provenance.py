"""Every result the product writes carries a provenance record in one format."""

import json

import numpy as np
import pytest

from cellsynth import __version__
from cellsynth._provenance import FORMAT, record, sidecar


def _check(rec: dict, operation: str) -> None:
    assert rec["format"] == FORMAT and rec["operation"] == operation and rec["cellsynth_version"] == __version__
    assert rec["created"].endswith("+00:00") and isinstance(rec["parameters"], dict)


@pytest.mark.parametrize("out, expected", [("points.csv", "points.provenance.json"),
                                           ("stained.ome.tif", "stained.provenance.json"),
                                           ("masks.tif", "masks.provenance.json")])
def test_sidecar_names(tmp_path, out, expected):
    assert sidecar(tmp_path / out) == tmp_path / expected


def test_a_record_hashes_its_inputs_and_is_plain_json(tmp_path):
    (tmp_path / "a.tif").write_bytes(b"abc")
    rec = record("x", inputs=[tmp_path / "a.tif", tmp_path / "gone.tif"], parameters={"t": (1, 2), "p": tmp_path,
                                                                                       "v": np.float32(0.5)})
    _check(rec, "x")
    assert rec["inputs"][0]["sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert rec["inputs"][1]["missing"] is True
    assert json.loads(json.dumps(rec))["parameters"] == {"t": [1, 2], "p": str(tmp_path), "v": 0.5}


def test_datasets_and_simulated_pairs_carry_their_record(tmp_path):
    from cellsynth.layouts import LayoutParams, export_dataset
    from cellsynth.stain.simulate import simulate_stain_pairs

    export_dataset(tmp_path / "lay", 2, params=LayoutParams(shape=(64, 64)), seed=3)
    rec = json.loads((tmp_path / "lay" / "provenance.json").read_text())
    _check(rec, "layouts")
    assert rec["parameters"]["seed"] == 3 and rec["result"]["n_items"] == 2
    # a resumed export of the same settings keeps working with the record in the folder
    export_dataset(tmp_path / "lay", 3, params=LayoutParams(shape=(64, 64)), seed=3)
    assert json.loads((tmp_path / "lay" / "provenance.json").read_text())["result"]["n_items"] == 3
    simulate_stain_pairs(tmp_path / "pairs", 1, shape=(64, 64))
    _check(json.loads((tmp_path / "pairs" / "provenance.json").read_text()), "simulate-stain-pairs")
