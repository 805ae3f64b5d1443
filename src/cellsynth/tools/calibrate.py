"""Calibrate a density counter's peak filtering on held-out synthetic images.

A network peak that lies outside the image's foreground objects (a dim nucleus
below Otsu's threshold, or a false peak on debris, noise or a halo) is kept when
its score reaches ``objects.keep_outside`` (see
:class:`~cellsynth.count.objects.ObjectParams`). This module picks that value for
a counter: the one with the lowest mean relative count error on ``n`` synthetic
nuclei images (:func:`synthetic_cases`: 8-60 px nuclei, log-uniform, with the
training appearance model: debris, halos, noise, illumination), counted with the
true diameter given, from seeds that neither training nor the benchmarks use.
With ``--write`` the value and a record of the calibration go into the counter
folder's ``config.json`` (written atomically; the weights are not touched).

Run::

    python -m cellsynth.tools.calibrate resources/models/counter-default [--n 48] [--seed 777] [--write]

No real image is used: calibration, like training, sees synthetic data only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

__all__ = ["synthetic_cases", "calibrate_keep_outside", "DEFAULT_GRID", "CALIBRATION_SEED"]

#: Values of ``keep_outside`` tried (a peak score is its height relative to a lone cell's).
DEFAULT_GRID = (0.3, 0.4, 0.5, 0.55, 0.6, 0.7, 0.8)
#: Seed of the calibration images (the benchmarks use 12345; training uses its own streams).
CALIBRATION_SEED = 777


def synthetic_cases(n: int, seed: int) -> Iterator[tuple[str, np.ndarray, np.ndarray, float]]:
    """``(name, uint16 image, true centres, median true diameter)`` of ``n`` synthetic images.

    Nuclei of 8-60 px (log-uniform mean size per image), image sides from 256 to
    1024 px growing with the size, coverage 5-40 %, the training appearance model.

    Examples
    --------
    >>> name, image, centres, d = next(synthetic_cases(1, seed=3))
    >>> name, image.dtype, centres.shape[1], bool(8 <= d <= 70)
    ('synthetic_00', dtype('uint16'), 2, True)
    """
    from ..count.synth import SynthParams, synthetic_nuclei

    rng = np.random.default_rng(seed)
    for i in range(int(n)):
        d = float(np.exp(rng.uniform(np.log(8), np.log(60))))
        side = int(np.clip(round(d * 24 / 32) * 32, 256, 1024))
        params = SynthParams(shape=(side, side), diameter=(d, d), coverage=(0.05, 0.4))
        img, centres, dd = synthetic_nuclei(params, rng=[seed, 7919, i])
        image = (img * 2000).clip(0, 65535).astype(np.uint16)
        yield f"synthetic_{i:02d}", image, np.asarray(centres, float).reshape(-1, 2), float(np.median(dd))


def calibrate_keep_outside(counter, cases: Sequence[tuple], grid: Sequence[float] = DEFAULT_GRID,
                           progress=None) -> dict:
    """Mean relative count error per ``keep_outside`` value, and the best value.

    Parameters
    ----------
    counter : Counter
        A density counter with ``objects`` in its config (it is restored on return).
    cases : sequence of (name, image, centres, diameter)
        Labelled images, e.g. from :func:`synthetic_cases`.
    grid : sequence of float
        Values tried.
    progress : callable, optional
        ``progress(done, total)`` after each count.

    Returns
    -------
    dict
        ``errors`` ({value: mean relative error}), ``best`` (the value with the
        lowest error; the lower value on ties) and ``n_images``.
    """
    from ..count.infer import count_cells

    if counter.kind != "density" or not counter.config.get("objects"):
        raise ValueError("only a density counter with object reconciliation (config 'objects') can be calibrated")
    grid = sorted(float(v) for v in grid)
    if not grid or any(not 0 <= v <= 10 for v in grid):
        raise ValueError(f"grid values must be scores from 0 to 10, got {grid}")
    objects = counter.config["objects"]
    before = objects.get("keep_outside")
    errors = {}
    done, total = 0, len(grid) * len(cases)
    try:
        for v in grid:
            objects["keep_outside"] = v
            errs = []
            for _, image, centres, diameter in cases:
                n = count_cells(image, counter=counter, diameter=diameter).count
                errs.append(abs(n - len(centres)) / max(len(centres), 1))
                done += 1
                if progress is not None:
                    progress(done, total)
            errors[v] = float(np.mean(errs))
    finally:
        objects["keep_outside"] = before
    best = min(grid, key=lambda v: (errors[v], v))
    return {"errors": errors, "best": best, "n_images": len(cases)}


def main(argv=None) -> int:
    from .. import io
    from ..count.models import load_counter

    ap = argparse.ArgumentParser(prog="python -m cellsynth.tools.calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="counter folder (config.json + model.safetensors)")
    ap.add_argument("--n", type=int, default=48, help="number of synthetic images (default 48)")
    ap.add_argument("--seed", type=int, default=CALIBRATION_SEED)
    ap.add_argument("--grid", default=",".join(str(v) for v in DEFAULT_GRID), help="comma-separated values to try")
    ap.add_argument("--write", action="store_true", help="write the best value into the folder's config.json")
    a = ap.parse_args(argv)
    try:
        grid = [float(v) for v in a.grid.split(",") if v.strip()]
        if a.n < 1:
            raise ValueError(f"--n must be at least 1, got {a.n}")
        folder = Path(a.model)
        if not (folder / "config.json").is_file():
            raise ValueError(f"{folder} is not a counter folder (no config.json)")
        counter = load_counter(folder, device="cpu")
        t0 = time.perf_counter()
        cases = list(synthetic_cases(a.n, a.seed))
        res = calibrate_keep_outside(counter, cases, grid)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for v, e in res["errors"].items():
        print(f"keep_outside {v:4.2f}: mean relative count error {100 * e:5.1f} %"
              f"{'   <- best' if v == res['best'] else ''}")
    print(f"{res['n_images']} synthetic images (seed {a.seed}), {time.perf_counter() - t0:.0f} s")
    if a.write:
        cfg = io.read_json(folder / "config.json")
        cfg.setdefault("objects", {})["keep_outside"] = res["best"]
        cfg["calibration"] = {
            "command": f"python -m cellsynth.tools.calibrate {folder.as_posix()} --n {a.n} --seed {a.seed} --write",
            "parameter": "objects.keep_outside",
            "data": f"{res['n_images']} synthetic images (cellsynth.tools.calibrate.synthetic_cases, seed {a.seed})",
            "mean_rel_error": {f"{v:g}": round(e, 4) for v, e in res["errors"].items()},
            "chosen": res["best"],
        }
        io.write_json(folder / "config.json", cfg, overwrite=True)
        print(f"wrote keep_outside {res['best']} into {folder / 'config.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
