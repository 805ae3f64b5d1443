"""The import map of the package, read from the source (function-level imports included): no new circles."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "cellsynth"

#: Circles still to be removed (each a set of modules that import each other, directly or not): none. The
#: test fails on any other circle, and on a listed one that is gone (then delete it here).
KNOWN: list[set[str]] = []


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def import_map() -> dict[str, set[str]]:
    """``module -> modules of the package it imports`` (any import statement anywhere in its file)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if is_pkg else name.split(".")[:-1]
                    here = here[: len(here) - (node.level - 1)]
                    base = ".".join(here + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != name and t.startswith("cellsynth"):
                    deps.add(t)
        graph[name] = deps
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.add(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(comp)
    return out


def test_the_import_map_finds_a_circle_it_is_shown():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_but_the_known_ones():
    found = circles(import_map())
    new = [sorted(c) for c in found if c not in KNOWN]
    gone = [sorted(c) for c in KNOWN if c not in found]
    assert not new, f"new import circles (move the shared part down): {new}"
    assert not gone, f"circles removed: delete them from KNOWN: {gone}"


def test_the_weights_stain_and_engine_circles_stay_closed():
    graph = import_map()
    assert "cellsynth.weights" not in graph["cellsynth.weights.download"]
    assert "cellsynth.stain.pipeline_stain" not in graph["cellsynth.stain.model"]
    assert not graph["cellsynth.count.engines"] & {"cellsynth.count.infer", "cellsynth.count.models"}


def test_the_dataset_writers_do_not_reach_up_into_batch():
    graph = import_map()
    for writer in ("cellsynth.layouts.dataset", "cellsynth.stylize.dataset"):
        assert not {m for m in graph[writer] if m.startswith("cellsynth.batch")}, writer


#: The floors of ../shared/DESIGN.md's import direction, bottom (1) to top: a module imports only its own
#: package and packages on lower floors. Within the rooms' floor, layouts (the generator) sits below the
#: rooms that draw layouts (count's synthetic data, stain's simulation, stylize's datasets).
FLOORS = {"layouts": 2.0, "count": 2.1, "stain": 2.1, "stylize": 2.2, "adapt": 3.0, "batch": 3.0, "_napari": 4.0,
          "cli": 5.0, "tools": 6.0}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _floor(module: str) -> float:
    return FLOORS.get(_room(module), 1.0) if "." in module else 0.5


def test_no_import_runs_back_up_the_floors():
    up = [f"{m} -> {d}" for m, deps in import_map().items() for d in deps
          if _room(d) != _room(m) and d != "cellsynth" and _floor(d) >= _floor(m) > 1.0]
    assert not up, f"imports running up (or across) the floors: {up}"


def _private_imports() -> list[str]:
    """``from X import _name`` or ``from X._module import ...`` where X is another room (module-level or not)."""
    mods = _modules()
    found = []
    for name, path in mods.items():
        here_pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            base = here_pkg[: len(here_pkg) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            if _room(name) == "tools":
                continue  # the build scripts of the shipped weights train the rooms' own networks
            if len(base) < 2 or base[1] == _room(name) or (len(base) == 2 and base[1].startswith("_")):
                continue  # the same room, or a private module at the package's top (shared by every room)
            hidden = [p for p in base[2:] if p.startswith("_")]
            names = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            if hidden or names:
                found.append(f"{name}: from {'.'.join(base)} import {', '.join(a.name for a in node.names)}")
    return found


def test_the_library_never_imports_the_build_scripts():
    """``cellsynth.tools`` (training and calibrating the shipped weights) is run by hand, not imported."""
    users = [f"{m} -> {d}" for m, deps in import_map().items() for d in deps
             if _room(d) == "tools" and _room(m) != "tools"]
    assert not users and "cellsynth.tools.train_default" in import_map(), users


def test_no_room_imports_another_rooms_private_names():
    assert not _private_imports()


def test_one_definition_of_the_counting_decisions():
    """The diameter rule, the large-plane threshold and plane splitting live in the library, once."""
    sources = {str(p.relative_to(SRC)): p.read_text() for p in SRC.rglob("*.py")}
    homes = {"model scale (no cells found": "count/infer.py", "4096 * 4096": "batch/lazy.py",
             "def split_planes(": "count/preprocess.py"}
    for needle, home in homes.items():
        assert [f for f, text in sources.items() if needle in text] == [home], needle
    for f, text in sources.items():
        if f.startswith("_napari/"):
            for call in ("split_planes(", "count_large(", "estimate_diameter(image", "LARGE_PIXELS"):
                assert call not in text, f"{f} decides itself what the library decides: {call}"
