"""Shared test set-up: no network, settings in a temporary folder."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CELLSYNTH_CONFIG_DIR", str(tmp_path_factory.mktemp("config")))
