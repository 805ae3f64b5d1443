"""Retraining from a few corrected images, measured per series: the other images of the series counted before and after.

The protocol of the loop's use: a person corrects every point of the first
``--corrected`` images of a series, retrains the default counter on them
(:func:`cellsynth.adapt.retrain_counter`, default budget), and counts the other
images of the series with the result, as ``cellsynth count IMAGE --model DIR
--diameter D`` does (``D`` from ``cases.csv``, the diameter a person types; the
estimated diameter is reported too). A series is a name prefix in
``cases.csv`` (``neurocyte_``, ``gowt1_``).

Labels of the development images are used for the error and for the corrected
images only, never for tuning. The error is the relative count error
``|points - true| / true``, averaged over the images that were not corrected.

``--adapt`` measures label-free adaptation instead: :func:`cellsynth.adapt.adapt_counter`
on all images of a series (no labels), then every image counted with the result.

Run: ``python benchmarks/bench_retrain_series.py [--data DIR] [--corrected 1] [--minutes 2] [--adapt]
[--json OUT]`` (about 6 minutes on 2 CPU cores with one corrected image or with ``--adapt --minutes 3``).
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from cellsynth import io
from cellsynth.adapt import adapt_counter, retrain_counter
from cellsynth.count import count_cells, load_counter
from cellsynth.count.data import read_image

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "real-nuclei-dev"


def series(folder: Path) -> dict[str, list[dict]]:
    with open(folder / "cases.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["name"].split("_")[0], []).append(
            {"name": r["name"], "diameter": float(r["diameter_px"]),
             "image": read_image(folder / f"{r['name']}.tif"),
             "points": np.asarray(io.read_points_csv(folder / f"{r['name']}.csv")[0], float).reshape(-1, 2)})
    return out


def _errors(counter, cases, diameter_key):
    errs = []
    for c in cases:
        d = c["diameter"] if diameter_key == "given" else "auto"
        n = count_cells(c["image"], counter=counter, diameter=d, engine="torch").count
        errs.append(abs(n - len(c["points"])) / max(len(c["points"]), 1))
    return errs


def run_series(name, cases, *, corrected, minutes, seed=0):
    train, rest = cases[:corrected], cases[corrected:]
    base = load_counter("default", device="cpu")
    out = {"series": name, "corrected": [c["name"] for c in train], "others": [c["name"] for c in rest]}
    for key in ("given", "auto"):
        out[f"base_{key}"] = _errors(base, rest, key)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        rt = retrain_counter([c["image"] for c in train], [c["points"] for c in train], out=Path(tmp) / "r",
                             minutes=minutes, seed=seed, device="cpu",
                             diameter=float(np.mean([c["diameter"] for c in train])))
        out["seconds"] = round(time.perf_counter() - t0, 1)
        new = load_counter(rt.path, device="cpu")
        for key in ("given", "auto"):
            out[f"retrained_{key}"] = _errors(new, rest, key)
    out["accepted"] = rt.accepted
    out["decision"] = rt.report.get("decision")
    return out


def adapt_series(name, cases, *, minutes, seed=0):
    base = load_counter("default", device="cpu")
    out = {"series": name, "corrected": [], "others": [c["name"] for c in cases]}
    for key in ("given", "auto"):
        out[f"base_{key}"] = _errors(base, cases, key)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ad = adapt_counter([c["image"] for c in cases], out=Path(tmp) / "a", minutes=minutes, seed=seed,
                           device="cpu", stylize="fast")
        out["seconds"] = round(time.perf_counter() - t0, 1)
        new = load_counter(ad.path, device="cpu")
        for key in ("given", "auto"):
            out[f"retrained_{key}"] = _errors(new, cases, key)
    out["accepted"] = ad.accepted
    out["decision"] = ad.report.get("decision")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--corrected", type=int, default=1, help="corrected images at the start of each series")
    ap.add_argument("--minutes", type=float, default=2.0, help="retraining budget")
    ap.add_argument("--adapt", action="store_true", help="label-free adaptation on each whole series instead")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    results = []
    for name, cases in series(args.data).items():
        if args.adapt:
            r = adapt_series(name, cases, minutes=args.minutes)
        elif len(cases) <= args.corrected:
            continue
        else:
            r = run_series(name, cases, corrected=args.corrected, minutes=args.minutes)
        results.append(r)
        print(f"\n== {name}: corrected {', '.join(r['corrected']) or 'none (adapted)'}; {r['seconds']} s; "
              f"accepted {r['accepted']}\n   {r['decision']}")
        for key in ("given", "auto"):
            b, a = np.mean(r[f"base_{key}"]), np.mean(r[f"retrained_{key}"])
            print(f"   other {len(r['others'])} images, diameter {key}: default {100 * b:.1f} %  retrained "
                  f"{100 * a:.1f} %   per image: " + " ".join(f"{100 * x:.0f}/{100 * y:.0f}" for x, y in
                                                          zip(r[f"base_{key}"], r[f"retrained_{key}"])))
    if results:
        for key in ("given", "auto"):
            b = np.mean([np.mean(r[f"base_{key}"]) for r in results])
            a = np.mean([np.mean(r[f"retrained_{key}"]) for r in results])
            print(f"mean over series, diameter {key}: default {100 * b:.1f} %  retrained {100 * a:.1f} %")
    if args.json:
        args.json.write_text(json.dumps(results, default=io.json_default, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
