"""Counting quality on real annotated nuclei images and on synthetic ones.

For every image, and as a mean over the images, prints the relative count error
``|count - true| / true`` and the point F1 (a prediction matches a true centre
within half a diameter, one to one) of

- ``default`` with the diameter given (the median true diameter of the set),
- ``default`` with ``diameter="auto"`` (the product's default),
- ``classic`` with the diameter given and with ``"auto"``,

plus the estimated diameter against the given one. The count is the number of
points, as ``cellsynth count --json`` reports it.

Real images: ``../shared/data/real-nuclei-dev`` (``NAME.tif`` + ``NAME.csv``,
``cases.csv`` with ``diameter_px``), for checking only. Synthetic images: held-out
seeds of :func:`cellsynth.count.synth.synthetic_nuclei` (never used in training),
with nuclei of 8 to 60 px.

Run: ``python benchmarks/bench_count_real.py [--data DIR] [--model default] [--synthetic 12] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from cellsynth import io
from cellsynth.count import count_cells, estimate_diameter, load_counter
from cellsynth.count.data import read_image
from cellsynth.count.metrics import match_points

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "real-nuclei-dev"


def real_cases(folder: Path):
    """``(name, image, centres, diameter)`` for each case listed in ``cases.csv``."""
    with open(folder / "cases.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        img = read_image(folder / f"{r['name']}.tif")
        pts, _ = io.read_points_csv(folder / f"{r['name']}.csv")
        yield r["name"], img, np.asarray(pts, float).reshape(-1, 2), float(r["diameter_px"])


def synthetic_cases(n: int, seed: int = 12345):
    """Held-out synthetic images with nuclei from 8 to 60 px (log-uniform); seed 12345 is this benchmark's."""
    from cellsynth.tools.calibrate import synthetic_cases as cases

    return cases(n, seed)


def run_one(image, centres, diameter, model, counters):
    rows = {}
    est = None
    try:
        est = estimate_diameter(image)
    except ValueError:
        pass
    for label, name, d in (
        (f"{model} (given)", model, diameter),
        (f"{model} (auto)", model, "auto"),
        ("classic (given)", "classic", diameter),
        ("classic (auto)", "classic", "auto"),
    ):
        t0 = time.perf_counter()
        res = count_cells(image, counter=counters[name], diameter=d)
        secs = time.perf_counter() - t0
        n_true = len(centres)
        m = match_points(res.points, centres, radius=0.5 * diameter)
        rows[label] = {
            "count": int(res.count),
            "true": n_true,
            "rel_error": abs(res.count - n_true) / max(n_true, 1),
            "f1": m["f1"],
            "seconds": secs,
        }
    return rows, est


def report(title, cases, model, counters):
    print(f"\n## {title}")
    per, ests = {}, []
    for name, img, centres, d in cases:
        rows, est = run_one(img, centres, d, model, counters)
        ests.append((est, d))
        cells = "  ".join(f"{k}: {v['count']:4d} ({100 * v['rel_error']:5.1f}%, F1 {v['f1']:.3f})" for k, v in rows.items())
        e = f"{est:5.1f}" if est is not None else "  n/a"
        print(f"{name:16s} true {len(centres):4d}  d {d:5.1f} est {e}  {cells}")
        for k, v in rows.items():
            per.setdefault(k, []).append(v)
    summary = {}
    for k, vs in per.items():
        summary[k] = {
            "mean_rel_error": float(np.mean([v["rel_error"] for v in vs])),
            "mean_f1": float(np.mean([v["f1"] for v in vs])),
            "mean_seconds": float(np.mean([v["seconds"] for v in vs])),
        }
        print(f"  mean {k:18s} rel error {100 * summary[k]['mean_rel_error']:5.1f} %   F1 {summary[k]['mean_f1']:.3f}"
              f"   {summary[k]['mean_seconds']:.2f} s/image")
    dev = [abs(e - d) / d for e, d in ests if e is not None]
    summary["diameter_estimate"] = {"mean_abs_rel_dev": float(np.mean(dev)) if dev else None,
                                    "max_abs_rel_dev": float(np.max(dev)) if dev else None,
                                    "failed": int(sum(e is None for e, _ in ests))}
    print(f"  diameter estimate: mean |est - d| / d = {100 * summary['diameter_estimate']['mean_abs_rel_dev']:.1f} %, "
          f"max {100 * summary['diameter_estimate']['max_abs_rel_dev']:.1f} %")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="folder of real annotated images (cases.csv)")
    ap.add_argument("--model", default="default", help="counter to compare with classic (default: default)")
    ap.add_argument("--synthetic", type=int, default=12, help="number of synthetic images (0: none)")
    ap.add_argument("--json", default=None, help="also write the summary as JSON here")
    a = ap.parse_args()
    counters = {a.model: load_counter(a.model, device="cpu"), "classic": load_counter("classic")}
    out = {}
    data = Path(a.data)
    if (data / "cases.csv").is_file():
        out["real"] = report(f"real images: {data}", real_cases(data), a.model, counters)
    else:
        print(f"no real images at {data} (cases.csv missing); skipped")
    if a.synthetic:
        out["synthetic"] = report(f"synthetic images ({a.synthetic}, held-out seeds)", synthetic_cases(a.synthetic),
                                  a.model, counters)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
