"""Shared test set-up: no network, settings in a temporary folder."""

import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# counters exported for onnxruntime are cached in a folder of the test run, not the user's cache
os.environ.setdefault("CELLSYNTH_ONNX_CACHE", tempfile.mkdtemp(prefix="cellsynth-onnx-"))


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CELLSYNTH_CONFIG_DIR", str(tmp_path_factory.mktemp("config")))


@pytest.fixture(autouse=True)
def _no_download_question():
    """No test inherits the napari plugin's download dialog (a modal dialog nobody answers would hang)."""
    from cellsynth import settings

    previous = settings.set_download_confirmer(None)
    yield
    settings.set_download_confirmer(previous)


@pytest.fixture
def one_torch_thread():
    """Tiny models run faster on one thread than split over a shared machine's cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
