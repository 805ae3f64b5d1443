"""Shared test set-up: no network, settings in a temporary folder."""

import hashlib
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


def _make_hub_cache(cache_dir, repo_id, commit, files):
    """Lay out files the way huggingface_hub's cache does: blobs, snapshot links, refs."""
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for rel, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def make_hub_cache():
    """``make_hub_cache(cache_dir, repo_id, commit, files) -> snapshot folder``: a local stand-in for the hub cache."""
    return _make_hub_cache


#: The docks as napari.yaml names them (Plugins > CellSynth > ...).
DOCKS = {"CountWidget": "Count cells", "LoopWidget": "Counting loop", "LayoutsWidget": "Cell layouts",
         "StylizeWidget": "Stylize (InST)", "StainWidget": "Virtual staining", "NSCWidget": "NSC masks"}


@pytest.fixture
def open_dock():
    """``open_dock(viewer, "Count cells") -> widget``, opened the way the Plugins menu opens it.

    napari then hands the widget a proxy of the viewer (every layer read through
    it is a new proxy object), which a widget built directly never sees.
    """

    def _open(viewer, name: str):
        _, widget = viewer.window.add_plugin_dock_widget("napari-cellsynth", name)
        return widget

    return _open


#: What in a test's own code makes it ``slow``: it starts interpreters or a dask cluster.
_SLOW_SIGNS = ("subprocess.", "sys.executable", "LocalCluster", 'cluster_client("local"', '"--scheduler", "local"', 'scheduler="local"',
               "--workers")


def _starts_something(func, seen: dict) -> bool:
    """Whether ``func``'s source shows a slow sign (looked up once per function: parametrised tests and
    shared fixtures would otherwise be read again for every test)."""
    import inspect

    key = getattr(func, "__code__", func)
    if key not in seen:
        try:
            source = inspect.getsource(func)
        except (OSError, TypeError):
            source = ""
        seen[key] = any(sign in source for sign in _SLOW_SIGNS)
    return seen[key]


def pytest_collection_modifyitems(config, items):
    """``gui`` on every test that opens a napari viewer, ``slow`` on those that start interpreters or clusters.

    ``pytest -m "not slow and not gui"`` is the quick run; ``.ci/run`` runs everything.
    """
    seen: dict = {}
    for item in items:
        if "make_napari_viewer" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.gui)
        func = getattr(item, "function", None)
        # the test's own source and that of the fixtures it uses (a fixture may start the cluster)
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {}) or {}
        funcs = [func] + [d.func for fds in defs.values() for d in fds if getattr(d, "baseid", "") != ""]
        if any(_starts_something(f, seen) for f in funcs if f is not None):
            item.add_marker(pytest.mark.slow)
