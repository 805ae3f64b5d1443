"""Counts and points of the shipped counters on fixed inputs, written once and compared after a change.

``python benchmarks/check_unchanged.py --write OUT.json`` records, for the
development images (``../shared/data/real-nuclei-dev``, when present) and a
synthetic set (held-out seeds of :func:`cellsynth.count.synth.synthetic_nuclei`,
one as a 3-plane stack), the count, the points (rounded to 1e-3 px), the scores and
the density sum of ``default`` and ``classic`` with the diameter given and
estimated. ``--compare OUT.json`` counts again and lists every difference;
exit status 1 when there is one. A refactoring that claims "behaviour
unchanged" runs ``--write`` before and ``--compare`` after.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from cellsynth.count import count_cells, load_counter
from cellsynth.count.data import read_image

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "real-nuclei-dev"


def _inputs(data: Path):
    if (data / "cases.csv").is_file():
        with open(data / "cases.csv", newline="") as fh:
            for r in csv.DictReader(fh):
                yield r["name"], read_image(data / f"{r['name']}.tif"), float(r["diameter_px"])
    from cellsynth.count.synth import SynthParams, synthetic_nuclei

    planes = []
    for i, d in enumerate((12.0, 20.0, 32.0)):
        img, _, _ = synthetic_nuclei(SynthParams(shape=(256, 256), diameter=(d, d)), rng=[777, i])
        img = (img * 3000).clip(0, 65535).astype(np.uint16)
        planes.append(img)
        yield f"synthetic_{i}", img, d
    yield "synthetic_stack", np.stack([p[:200, :200] for p in planes]), 20.0


def _digest(res) -> dict:
    pts = np.round(np.asarray(res.points, float), 3)
    return {"count": res.count, "points": hashlib.sha256(pts.tobytes()).hexdigest()[:16],
            "scores": hashlib.sha256(np.round(np.asarray(res.scores, float), 4).tobytes()).hexdigest()[:16],
            "density_sum": None if res.density_sum is None else round(res.density_sum, 4),
            "per_plane": [float(x) for x in np.ravel(res.per_plane)]}


def record(data: Path = DATA) -> dict:
    counters = {m: load_counter(m, device="cpu") for m in ("default", "classic")}
    out = {}
    for name, img, d in _inputs(data):
        for m, c in counters.items():
            for dk, dv in (("given", d), ("auto", "auto")):
                out[f"{name}/{m}/{dk}"] = _digest(count_cells(img, counter=c, diameter=dv, engine="torch"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", type=Path)
    g.add_argument("--compare", type=Path)
    ap.add_argument("--data", type=Path, default=DATA, help="folder of the development images (cases.csv)")
    args = ap.parse_args(argv)
    now = record(args.data)
    if args.write:
        args.write.write_text(json.dumps(now, indent=1))
        print(f"recorded {len(now)} counts in {args.write}")
        return 0
    then = json.loads(args.compare.read_text())
    diff = [k for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k)]
    for k in diff:
        print(f"differs: {k}: {then.get(k)} -> {now.get(k)}")
    print(f"{len(now) - len(diff)} of {len(now)} counts identical")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
