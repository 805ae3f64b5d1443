"""Interrupting training: SIGTERM (handled like Ctrl-C) mid-run leaves whole files, and a re-run resumes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from cellsynth import io
from cellsynth.cli import main


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "ds"
    assert main(["layouts", "--n", "2", "--size", "64", "64", "--count-mean", "6", "--count-std", "1",
                 "--out", str(out)]) == 0
    return out


TRAIN = ["--steps-per-epoch", "2", "--batch-size", "2", "--crop", "64", "--backbone", "test_efficientnet",
         "--quiet"]


def test_training_interrupted_mid_run_keeps_whole_files_and_resumes(dataset, tmp_path):
    """SIGTERM (a job scheduler's stop) takes the same path as Ctrl-C, with status 143."""
    sig, status = signal.SIGTERM, 143
    from safetensors.torch import load_file

    from cellsynth.count import load_counter

    out = tmp_path / "model"
    proc = subprocess.Popen([sys.executable, "-m", "cellsynth.cli", "train-counter", str(dataset), "--out", str(out),
                             "--epochs", "500"] + TRAIN, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = out / "checkpoint" / "state.json"
    deadline = time.time() + 240
    while not state.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert state.is_file(), proc.stderr.read() if proc.poll() is not None else "no checkpoint in time"
    time.sleep(0.5)  # well inside a later epoch
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-2000:]
    assert "Traceback" not in err
    assert not list(out.rglob("*.part")), "unfinished temporary files left behind"
    doc = io.read_json(state)
    assert doc["epoch"] == len(doc["history"]) >= 1
    load_file(str(out / "checkpoint" / "model.safetensors"))
    assert load_counter(out).kind == "density"  # the best model so far is whole and loads
    # a re-run resumes where the checkpoint stands and finishes
    epochs = doc["epoch"] + 2
    res = subprocess.run([sys.executable, "-m", "cellsynth.cli", "train-counter", str(dataset), "--out", str(out),
                          "--epochs", str(epochs), "--resume"] + TRAIN, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    final = io.read_json(state)
    assert [h["epoch"] for h in final["history"]] == list(range(1, epochs + 1))
    assert final["history"][: doc["epoch"]] == doc["history"]
