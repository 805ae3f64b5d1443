"""The adaptation loop measured: count error of base -> adapted -> retrained, and seconds per step.

For each image set:

1. ``base``: the default counter as ``cellsynth count IMAGE`` runs it (diameter estimated);
2. ``adapted``: :func:`cellsynth.adapt.adapt_counter` on the set's images (no
   labels), counted as ``cellsynth count IMAGE --model DIR`` runs it (with the
   diameter only when the report says the counter needs one);
3. ``retrained``: :func:`cellsynth.adapt.retrain_counter` from the adapted
   counter with the true points of the first image (one corrected image); the
   error is measured on the other images.

The error is the relative count error ``|points - true| / true`` (mean over the
images). Sets: ``../shared/data/real-nuclei-dev`` (for checking only: labels are
used for the error and for the one "corrected" image, never for tuning), and a
synthetic series (held-out seeds of :func:`cellsynth.count.synth.synthetic_nuclei`
at one nucleus size).

Run: ``python benchmarks/bench_loop.py [--data DIR] [--adapt-minutes 3] [--retrain-minutes 2]
[--synthetic 4] [--synthetic-minutes 1] [--json OUT]``. The defaults finish in about 8 minutes
on 2 CPU cores.
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


def real_set(folder: Path):
    with open(folder / "cases.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    images = [read_image(folder / f"{r['name']}.tif") for r in rows]
    points = [np.asarray(io.read_points_csv(folder / f"{r['name']}.csv")[0], float).reshape(-1, 2) for r in rows]
    return [r["name"] for r in rows], images, points


def synthetic_set(n: int, diameter: float = 20.0, seed: int = 4242):
    from cellsynth.count.synth import SynthParams, synthetic_nuclei

    params = SynthParams(shape=(384, 384), diameter=(diameter, diameter), coverage=(0.1, 0.3), plain_fraction=0.0)
    names, images, points = [], [], []
    for i in range(n):
        img, centres, _ = synthetic_nuclei(params, rng=[seed, i])
        names.append(f"synthetic_{i}")
        images.append((img * 2000).clip(0, 65535).astype(np.uint16))
        points.append(centres)
    return names, images, points


def _counts(images, counter, diameter="auto"):
    """Counts as ``cellsynth count IMAGE [--diameter D]`` gives them (the diameter estimated by default)."""
    return [int(count_cells(im, counter=counter, diameter=diameter if diameter else "auto").count) for im in images]


def _rel(counts, truth):
    return [abs(c - len(t)) / max(len(t), 1) for c, t in zip(counts, truth)]


def run_set(label, names, images, points, *, adapt_minutes, retrain_minutes, seed=0):
    truth_n = [len(p) for p in points]
    base = load_counter("default", device="cpu")
    t0 = time.perf_counter()
    base_counts = _counts(images, base)
    t_base = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ad = adapt_counter(images, out=Path(tmp) / "adapted", minutes=adapt_minutes, stylize="fast", seed=seed,
                           device="cpu")
        t_adapt = time.perf_counter() - t0
        d_use = ad.report["diameter"]["used"] if "note" in ad.report else None
        adapted = load_counter(ad.path, device="cpu")
        adapted_counts = _counts(images, adapted, d_use)
        t0 = time.perf_counter()
        rt = retrain_counter(images[:1], points[:1], out=Path(tmp) / "retrained", base=ad.path,
                             minutes=retrain_minutes, seed=seed, device="cpu")
        t_retrain = time.perf_counter() - t0
        d_use_r = rt.report["diameter"]["used"] if "note" in rt.report else None
        retrained = load_counter(rt.path, device="cpu")
        retrained_counts = _counts(images, retrained, d_use_r)
    e_base, e_ad, e_rt = _rel(base_counts, points), _rel(adapted_counts, points), _rel(retrained_counts, points)
    print(f"\n== {label}: {len(images)} images, diameter used {ad.report['diameter']['used']:.1f} px, "
          f"working scale {ad.report['working_scale']:.1f} px")
    print(f"{'image':<16}{'true':>6}{'base':>7}{'adapted':>9}{'retrained':>11}")
    for i, n in enumerate(names):
        tag = " (corrected)" if i == 0 else ""
        print(f"{n:<16}{truth_n[i]:>6}{base_counts[i]:>7}{adapted_counts[i]:>9}{retrained_counts[i]:>11}{tag}")
    rest = slice(1, None)
    print(f"mean relative error, all images:      base {np.mean(e_base):.3f}  adapted {np.mean(e_ad):.3f}  "
          f"retrained {np.mean(e_rt):.3f}")
    if len(images) > 1:
        print(f"mean relative error, images 2..n:     base {np.mean(e_base[rest]):.3f}  adapted {np.mean(e_ad[rest]):.3f}  "
              f"retrained {np.mean(e_rt[rest]):.3f}")
    print(f"adapt accepted: {ad.accepted}  label-free score {ad.report['score_before']['score']:.3f} -> "
          f"{ad.report['score_after']['score']:.3f} (synthetic error {ad.report['score_before']['synthetic_error']:.3f} -> "
          f"{ad.report['score_after']['synthetic_error']:.3f}); {ad.report['training']['steps']} steps")
    val_b, val_a = rt.report["score_before"].get("validation"), rt.report["score_after"].get("validation")
    val = (f", validation strip ({val_b['n_true']} cells) error {val_b['error']:.3f} -> {val_a['error']:.3f}, "
           f"score {val_b['score']:.3f} -> {val_a['score']:.3f}, best at step {rt.report['training']['best_step']}"
           if val_b and val_a else "")
    print(f"retrain accepted: {rt.accepted}  region error {rt.report['score_before']['region_error']:.3f} -> "
          f"{rt.report['score_after']['region_error']:.3f}{val}; {rt.report['training']['steps']} steps")
    print(f"seconds: base count {t_base:.1f}, adapt {t_adapt:.1f} (budget {60 * adapt_minutes:.0f}), "
          f"retrain {t_retrain:.1f} (budget {60 * retrain_minutes:.0f})")
    print("adapt steps (s): " + ", ".join(f"{k} {v:.1f}" for k, v in ad.report["seconds"].items()))
    print("retrain steps (s): " + ", ".join(f"{k} {v:.1f}" for k, v in rt.report["seconds"].items()))
    return {"set": label, "names": names, "true": truth_n, "base": base_counts, "adapted": adapted_counts,
            "retrained": retrained_counts, "rel_error": {"base": e_base, "adapted": e_ad, "retrained": e_rt},
            "adapt_report": ad.report, "retrain_report": rt.report,
            "seconds": {"base_count": t_base, "adapt": t_adapt, "retrain": t_retrain}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--adapt-minutes", type=float, default=3.0)
    ap.add_argument("--retrain-minutes", type=float, default=2.0)
    ap.add_argument("--synthetic", type=int, default=4, help="synthetic images (0: skip)")
    ap.add_argument("--synthetic-minutes", type=float, default=1.0, help="budget of each step on the synthetic set")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    results = []
    if (args.data / "cases.csv").is_file():
        results.append(run_set("real-nuclei-dev", *real_set(args.data), adapt_minutes=args.adapt_minutes,
                               retrain_minutes=args.retrain_minutes))
    else:
        print(f"no real images at {args.data}; skipped")
    if args.synthetic:
        results.append(run_set("synthetic 20 px", *synthetic_set(args.synthetic), adapt_minutes=args.synthetic_minutes,
                               retrain_minutes=args.synthetic_minutes))
    if args.json:
        args.json.write_text(json.dumps(results, default=io.json_default, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
