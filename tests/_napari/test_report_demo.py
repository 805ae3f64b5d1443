"""Cells per region and marker classes in the Count dock, checked against a synthetic image's truth and the CLI."""

import csv
import json

import numpy as np
import pytest

pytest.importorskip("napari")


def _inside(centres: np.ndarray, kind: str, v: np.ndarray) -> np.ndarray:
    """The truth: which centres lie in a region (the rounded centre pixel, as the product's stated rule)."""
    p = np.round(centres)
    (r0, c0), (r1, c1) = v.min(0), v.max(0)
    if kind == "rectangle":
        return (p[:, 0] >= r0) & (p[:, 0] <= r1) & (p[:, 1] >= c0) & (p[:, 1] <= c1)
    cr, cc, ar, ac = (r0 + r1) / 2, (c0 + c1) / 2, (r1 - r0) / 2, (c1 - c0) / 2
    return ((p[:, 0] - cr) / ar) ** 2 + ((p[:, 1] - cc) / ac) ** 2 <= 1


@pytest.mark.slow  # the shipped counter's real weights on a 256x384 image, the dock and the CLI
def test_regions_and_marker_classes_match_the_truth_and_the_cli(make_napari_viewer, tmp_path, capsys):
    import tifffile

    from cellsynth._napari.report_demo import REGIONS, open_report_viewer, two_channel_image, write_regions_csv
    from cellsynth.cli import main

    image, centres, positive = two_channel_image()
    viewer, dock = open_report_viewer(make_napari_viewer(), out=tmp_path / "export")
    # 1. counted: every nucleus, none twice
    pts = viewer.layers["DAPI cells"]
    assert len(pts.data) == len(centres)
    # 2. cells per region as the truth has them
    truth = [int(_inside(centres, kind, v).sum()) for kind, v in REGIONS.items()]
    assert [r["count"] for r in dock.regions.rows] == truth and min(truth) > 5
    # 3. the marker: positive fraction within 2 points of the truth's, at Otsu's threshold
    summary = dock.markers.summary
    got = {r["class"]: r["percent"] for r in summary["classes"]}
    assert abs(got["Ki67+"] - 100 * positive.mean()) <= 2.0 and summary["threshold_method"] == "otsu"
    # 4. exported: the region table and the points with their class and region
    rows = list(csv.DictReader(open(tmp_path / "export" / "regions.csv")))
    assert [int(r["count"]) for r in rows] == truth
    cells = list(csv.DictReader(open(tmp_path / "export" / "cells.csv")))
    assert len(cells) == len(centres) and {"class", "region", "score", "area_px"} <= set(cells[0])
    # each nucleus's area: its object (disks of 14 px, 154 px², blurred: brighter ones reach further)
    areas = np.array([float(c["area_px"]) for c in cells]) / (np.pi * 7.0 ** 2)
    assert abs(np.median(areas) - 1) < 0.15 and np.all(np.abs(areas - 1) < 0.3), np.round(areas, 2)
    # every export carries its provenance: version, date, the model and its weights' hash, the parameters
    for name in ("cells", "regions"):
        rec = json.loads((tmp_path / "export" / f"{name}.provenance.json").read_text())
        assert rec["format"] == "cellsynth-provenance" and rec["cellsynth_version"] and rec["created"]
        assert len(rec["model"]["sha256"]) == 64 and rec["parameters"]["diameter_used"] == 14.0
    # 5. the CLI on the same image, regions and channel: the same counts per region and per class
    tifffile.imwrite(tmp_path / "two.tif", image, imagej=True, metadata={"axes": "CYX"})
    capsys.readouterr()
    assert main(["count", str(tmp_path / "two.tif"), "--channel", "0", "--diameter", "14", "--regions",
                 str(write_regions_csv(tmp_path / "regions_in.csv")), "--measure-channels", "1", "--marker-names",
                 "Ki67", "--json", "--quiet"]) == 0
    out = capsys.readouterr()
    doc = json.loads(out.out.strip().splitlines()[-1]) if out.out.strip() else pytest.fail(out.err)
    assert doc["count"] == len(centres) and [r["count"] for r in doc["regions"]] == truth
    assert {r["class"]: r["count"] for r in doc["markers"]["classes"]} == \
        {r["class"]: r["count"] for r in summary["classes"]}


@pytest.mark.parametrize("module", ["report_demo", "loop_demo"])
def test_a_demo_never_replaces_an_existing_screenshot(tmp_path, capsys, module):
    import importlib

    shot = tmp_path / "shot.png"
    shot.write_bytes(b"mine")
    assert importlib.import_module(f"cellsynth._napari.{module}").main(["--screenshot", str(shot)]) == 2
    assert capsys.readouterr().err.startswith("error:") and shot.read_bytes() == b"mine"
