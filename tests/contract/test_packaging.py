"""Import hygiene and plugin discovery."""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ["torch", "diffusers", "transformers", "timm"]
GUI = ["napari", "qtpy", "PyQt6", "magicgui"]


def _loaded_after(code: str) -> set:
    probe = f"import sys, json\n{code}\nprint(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(json.loads(res.stdout.strip().splitlines()[-1]))


@pytest.mark.slow  # a fresh interpreter per probe
@pytest.mark.parametrize(
    "module, banned",
    [
        ("cellsynth", HEAVY + GUI),
        ("cellsynth.layouts", HEAVY + GUI),
        ("cellsynth.io", HEAVY + GUI),
        ("cellsynth.progress", HEAVY + GUI),
        ("cellsynth.device", HEAVY + GUI),
        ("cellsynth.weights", HEAVY + GUI),
        ("cellsynth.cli", HEAVY + GUI),
        ("cellsynth.count", HEAVY + GUI),
        ("cellsynth._napari.layouts_widget", HEAVY),
        ("cellsynth._napari.sample", HEAVY),
        ("cellsynth._napari.count_widget", HEAVY),
        ("cellsynth._napari.stain_widget", HEAVY),
        ("cellsynth._napari.nsc_widget", HEAVY),
        ("cellsynth._napari.points_io", HEAVY + GUI),
        ("cellsynth.stylize", HEAVY + GUI),
        ("cellsynth.stain", HEAVY + GUI),
    ],
)
def test_imports_stay_light(module, banned):
    loaded = _loaded_after(f"import {module}")
    assert not loaded & set(banned), f"{module} imported {sorted(loaded & set(banned))}"


def test_cli_parser_builds_without_heavy_imports():
    loaded = _loaded_after("from cellsynth.cli import build_parser; build_parser()")
    assert not loaded & set(HEAVY + GUI)


def test_cli_command_map_lists_what_each_module_registers():
    import argparse
    import importlib

    from cellsynth.cli import _COMMAND_MODULES, _command, build_parser

    for name, commands in _COMMAND_MODULES.items():
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(name).register(sub)
        assert tuple(sub.choices) == commands, name
    everything = build_parser()._subparsers._group_actions[0].choices
    for name, commands in _COMMAND_MODULES.items():
        for command in commands:
            one = build_parser(command)._subparsers._group_actions[0].choices
            assert set(one) == set(commands) | {"demo", "settings"}
            assert one[command].format_help() == everything[command].format_help()
    # top-level help lists every command, whatever follows it
    assert set(build_parser(_command(["-h", "count"]))._subparsers._group_actions[0].choices) == set(everything)


def test_a_batch_command_line_parses_without_scipy():
    # the parser of one subcommand imports only its module: count-batch starts its workers sooner
    loaded = _loaded_after("from cellsynth.cli import build_parser, _command\n"
                           "argv = ['count-batch', 'in', '--out', 'o', '--diameter', '12']\n"
                           "a = build_parser(_command(argv)).parse_args(argv)\n"
                           "assert a.diameter == 12.0 and a.inputs == ['in'], a")
    assert "scipy" not in loaded and "torch" not in loaded
    assert _loaded_after("from cellsynth.cli import build_parser; build_parser('count')") >= {"scipy"}


def test_napari_discovers_the_plugin_with_every_contribution():
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("napari-cellsynth")
    declared = {c.id for c in manifest.contributions.commands}
    assert {"napari-cellsynth.layouts_widget", "napari-cellsynth.sample_layout"} <= declared
    # every command resolves to a real callable
    for cmd in manifest.contributions.commands:
        module, attr = cmd.python_name.split(":")
        obj = __import__(module, fromlist=[attr])
        assert callable(getattr(obj, attr)), cmd.python_name
    assert {w.display_name for w in manifest.contributions.widgets} >= {"Cell layouts"}
    assert {s.key for s in manifest.contributions.sample_data} >= {"layout"}
    # what napari loaded is the root napari.yaml
    from npe2 import PluginManifest

    root = PluginManifest.from_file(ROOT / "napari.yaml")
    assert root.contributions == manifest.contributions
    assert manifest.package_metadata.name == "napari-cellsynth"


def test_npe2_validate_passes():
    npe2 = Path(sys.executable).with_name("npe2")
    res = subprocess.run([str(npe2), "validate", "napari-cellsynth"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "valid" in res.stdout


@pytest.mark.slow
def test_wheel_carries_the_manifest_and_resources(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("needs git")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    wheel = next(tmp_path.glob("napari_cellsynth-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert zf.read("cellsynth/napari.yaml").decode() == (ROOT / "napari.yaml").read_text()
        entry = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "napari-cellsynth = cellsynth:napari.yaml" in entry
    assert "cellsynth = cellsynth.cli:run" in entry
    shipped = {p.relative_to(ROOT / "resources").as_posix() for p in (ROOT / "resources").rglob("*") if p.is_file()}
    assert {f"cellsynth/_resources/{s}" for s in shipped} <= names
