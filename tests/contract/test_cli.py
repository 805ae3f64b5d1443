import dataclasses
import subprocess
import sys

import numpy as np

from cellsynth import io
from cellsynth.cli import main
from cellsynth.layouts import LayoutParams


def test_layouts_command_writes_a_dataset(tmp_path, capsys):
    out = tmp_path / "ds"
    rc = main(["layouts", "--n", "3", "--size", "40", "50", "--seed", "2", "--out", str(out),
               "--count-mean", "8", "--count-std", "2", "--clusters", "2", "3", "--no-rotation"])
    assert rc == 0
    doc = io.read_json(out / "manifest.json")
    assert doc["params"]["shape"] == [40, 50] and doc["params"]["clusters"] == [2, 3]
    assert doc["params"]["rotation"] is False and doc["params"]["count_mean"] == 8.0
    assert len(doc["items"]) == 3 and doc["seed"] == 2
    assert "wrote 3 layouts" in capsys.readouterr().out
    angles = np.concatenate([io.read_points_csv(out / it["centres"])[1]["angle"] for it in doc["items"]])
    assert np.all(angles == 0)


def test_layouts_command_errors_are_one_line(tmp_path, capsys):
    assert main(["layouts", "--n", "2", "--out", str(tmp_path / "d"), "--max-overlap", "2"]) == 2
    assert "max_overlap" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep")
    assert main(["layouts", "--n", "1", "--out", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "full" / "x.txt").read_text() == "keep"


def test_console_script_help_documents_every_parameter():
    res = subprocess.run([sys.executable, "-m", "cellsynth.cli", "layouts", "--help"], capture_output=True, text=True,
                         check=True)
    for f in dataclasses.fields(LayoutParams):
        if f.name != "shape":
            assert "--" + f.name.replace("_", "-") in res.stdout
    assert "--size" in res.stdout and "--overwrite" in res.stdout


def test_console_entry_point_output_and_exit_status(tmp_path):
    # `cellsynth` runs cli.run: main, then an exit that skips the final garbage collection; what was printed
    # to a pipe and written to files must all be there, and the status must be main's
    from importlib.metadata import entry_points

    entry = "import sys; from cellsynth.cli import run; sys.exit(run())"
    out = tmp_path / "ds"
    res = subprocess.run([sys.executable, "-c", entry, "layouts", "--n", "2", "--size", "40", "40", "--out", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("wrote 2 layouts") and res.stdout.endswith("\n")
    assert len(io.read_json(out / "manifest.json")["items"]) == 2
    bad = subprocess.run([sys.executable, "-c", entry, "layouts", "--n", "2", "--out", str(out)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and bad.stdout == ""
    assert [e.value for e in entry_points(group="console_scripts") if e.name == "cellsynth"] == ["cellsynth.cli:run"]
