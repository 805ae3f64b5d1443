"""Batch counting on dask.distributed: 2 local workers vs a serial loop, start-up, and the memory of a large image.

Prints
- ``ratio``: serial loop vs ``count-batch`` on a 2-worker ``LocalCluster`` (one
  thread each) over ``--images`` generated 512x512 uint16 TIFFs, with the shipped
  default counter and the diameter estimated (goal >= 1.6 on 2 cores), the ONNX
  export of the counter cached beforehand (as after any first use):

  * end to end, both sides as a user runs them, each in a fresh process timed
    from its start (interpreter start, imports, counter load included on both
    sides): the serial side is one Python process that loads the counter once
    and, image after image, reads it, counts it (``count_cells``, all cores:
    onnxruntime's threads) and writes its points CSV; the batch side is the
    ``cellsynth count-batch --workers 2`` command (cluster start, the workers'
    imports and counter loads, records, points CSVs, ``counts.csv`` and the plot
    included); ``--rounds`` runs of each side in the order serial, batch, batch,
    serial, ... (the speed of a shared machine drifts over minutes), their means
    compared;
  * warm: the serial loop alone (counter loaded) vs ``count_batch`` on a cluster
    already started whose workers have each counted one plane.

  The counts of the two must be equal image by image.
- ``start-up``: ``cellsynth count IMAGE`` on a 256x256 image in a fresh process
  (cached export: neither torch nor timm imported), the same command in a
  process that imports torch and timm first (what it paid before counters
  loaded from a cached export), and with ``CELLSYNTH_ENGINE=torch``.
- the peak resident memory (RSS) of a separate process that counts a
  ``--large`` x ``--large`` uint16 tiled TIFF with ``count_large`` (never read
  whole; goal <= 2 GB for 20000 x 20000), with its count and time.

Run: ``python benchmarks/bench_batch.py [--images 100] [--rounds 2] [--large 20000] [--skip-ratio] [--skip-startup] [--skip-large]``.
The machine's other load changes the times: compare the ratios, measured in one run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_CLI = "import sys; from cellsynth.cli import run; sys.exit(run())"  # what the `cellsynth` command runs

_SERIAL = r"""
import json, sys, time
from pathlib import Path
from cellsynth import io
from cellsynth.count import count_cells, load_counter
from cellsynth.count.engines import default_threads
from cellsynth.count.data import read_image_axes
counter = load_counter("default", device="cpu")
out = Path(sys.argv[2])
out.mkdir()
counts, t0 = {}, time.perf_counter()
for p in sorted(Path(sys.argv[1]).glob("*.tif")):
    image, ch = read_image_axes(p)
    res = count_cells(image, counter=counter, channel_axis=ch)
    io.write_points_csv(out / (p.stem + ".csv"), res.points, features={"score": res.scores})
    counts[p.name] = res.count
print(json.dumps({"loop_s": time.perf_counter() - t0, "engine": res.meta["engine"], "threads": default_threads(),
                  "torch": "torch" in sys.modules, "counts": counts}))
"""


def _synthetic_uint16(shape, seed, diameter=(14.0, 16.0)) -> np.ndarray:
    from cellsynth.count.synth import SynthParams, synthetic_nuclei

    img, _, _ = synthetic_nuclei(SynthParams(shape=shape, diameter=diameter, coverage=(0.1, 0.35)), rng=seed)
    return (np.clip(img, 0, 4) / 4 * 60000).astype(np.uint16)


def _timed(cmd: list, env: dict | None = None) -> tuple:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed: {out.stderr[-2000:]}")
    return wall, out.stdout


def _warm_export() -> None:
    """The default counter's ONNX export in the cache (made once, with torch, when missing)."""
    from cellsynth.count import engines, load_counter

    engines.export_bytes(load_counter("default", device="cpu"))


def _ratio(n_images: int, workdir: Path, rounds: int = 2) -> dict:
    import tifffile

    from cellsynth.batch import BatchParams, cluster_client, count_batch

    folder = workdir / "images"
    folder.mkdir()
    for i in range(n_images):
        tifffile.imwrite(folder / f"field_{i:03d}.tif", _synthetic_uint16((512, 512), i))
    paths = sorted(folder.glob("*.tif"))
    _warm_export()

    # end to end, each side a fresh process, in the order serial, batch, batch, serial (the machine's speed
    # drifts over minutes on shared hosts; this order gives both sides the same average moment)
    serial_times, batch_times = [], []

    def serial_run(k: int) -> dict:
        wall, text = _timed([sys.executable, "-c", _SERIAL, str(folder), str(workdir / f"serial{k}")])
        serial_times.append(wall)
        return json.loads(text.strip().splitlines()[-1])

    def batch_run(k: int) -> dict:
        wall, _ = _timed([sys.executable, "-c", _CLI, "count-batch", str(folder), "--out", str(workdir / f"cold{k}"),
                          "--workers", "2", "--device", "cpu", "--quiet"])
        batch_times.append(wall)
        with open(workdir / f"cold{k}" / "counts.csv", newline="") as fh:
            return {Path(r["image"]).name: int(r["count"]) for r in csv.DictReader(fh)}

    doc = serial_run(0)
    cold_counts = batch_run(0)
    if rounds > 1:
        for k in range(1, rounds):
            batch_run(k) if k % 2 else serial_run(k)
            serial_run(k) if k % 2 else batch_run(k)
    serial = doc["counts"]
    t_serial, t_cold = float(np.mean(serial_times)), float(np.mean(batch_times))

    # warm: cluster started, each worker has counted one plane
    params = BatchParams(model="default", device="cpu")
    with cluster_client("local", workers=2) as client:
        from cellsynth.batch.engine import count_plane

        for w in client.scheduler_info(n_workers=-1)["workers"]:
            client.submit(count_plane, str(paths[0]), (), params, workers=[w], pure=False).result()
        t0 = time.perf_counter()
        warm = count_batch([folder], workdir / "warm", params=params, scheduler=client)
        t_warm = time.perf_counter() - t0
        workers_torch = any(client.run(lambda: "torch" in sys.modules or "timm" in sys.modules).values())
    batch = {Path(r["image"]).name: r["count"] for r in warm.rows}
    return {
        "images": n_images, "serial_runs_s": [round(t, 1) for t in serial_times],
        "batch_runs_s": [round(t, 1) for t in batch_times], "serial_end_to_end_s": round(t_serial, 2), "serial_loop_s": round(doc["loop_s"], 2),
        "batch_end_to_end_s": round(t_cold, 2), "batch_warm_s": round(t_warm, 2),
        "ratio_end_to_end": round(t_serial / t_cold, 3), "ratio_warm": round(doc["loop_s"] / t_warm, 3),
        "serial_engine": doc["engine"], "serial_threads": doc["threads"], "serial_torch": doc["torch"],
        "workers_torch": workers_torch,
        "counts_equal": batch == serial and cold_counts == serial, "total_cells": int(sum(serial.values())),
    }


def _startup(workdir: Path, repeats: int = 2) -> dict:
    import tifffile

    img = workdir / "startup.tif"
    tifffile.imwrite(img, _synthetic_uint16((256, 256), 7))
    _warm_export()
    count = [str(img), "--quiet", "--json"]
    runs = {
        "onnx_cached": ([sys.executable, "-c", _CLI, "count", *count], None),
        "torch_timm_imported_first": ([sys.executable, "-c", "import torch, timm; " + _CLI, "count", *count], None),
        "torch_engine": ([sys.executable, "-c", _CLI, "count", *count], {"CELLSYNTH_ENGINE": "torch"}),
    }
    out = {}
    for name, (cmd, env) in runs.items():
        times = []
        for _ in range(repeats):
            wall, text = _timed(cmd, env)
            times.append(round(wall, 2))
        doc = json.loads(text.strip().splitlines()[-1])
        out[name] = {"seconds": times, "count": doc["count"], "engine": doc["meta"]["engine"]}
    return out


def _write_large(path: Path, side: int, tile: int = 400) -> None:
    """A ``side`` x ``side`` uint16 tiled TIFF of synthetic nuclei, written band by band."""
    import tifffile

    block = 2 * tile
    pool = [_synthetic_uint16((block, block), 1000 + k) for k in range(12)]
    rng = np.random.default_rng(0)
    n = -(-side // tile)

    def tiles():
        for br in range(0, n, 2):
            picks = [pool[int(rng.integers(len(pool)))] for _ in range(0, n, 2)]
            band = np.concatenate(picks, axis=1)
            for r in range(br, min(br + 2, n)):
                for c in range(n):
                    rr, cc = (r - br) * tile, c * tile
                    yield np.ascontiguousarray(band[rr:rr + tile, cc:cc + tile])

    tifffile.imwrite(path, tiles(), shape=(side, side), dtype=np.uint16, tile=(tile, tile), compression="zlib")


_MEASURE = r"""
import json, resource, sys, time
from cellsynth.batch import count_large, open_image
t0 = time.perf_counter()
img = open_image(sys.argv[1])
plane, ch = img.plane(())
res = count_large(plane, channel_axis=ch, model=sys.argv[2], device="cpu")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"count": res.count, "chunks": res.meta["chunks"], "diameter": res.meta["diameter_used"],
                  "seconds": round(time.perf_counter() - t0, 1), "peak_rss_gb": round(peak / 1e9, 3)}))
"""


def _large(side: int, workdir: Path, model: str = "default") -> dict:
    path = workdir / f"large_{side}.tif"
    t0 = time.perf_counter()
    _write_large(path, side)
    t_write = time.perf_counter() - t0
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), model], capture_output=True, text=True, check=True)
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    doc.update({"model": model, "side": side, "file_mb": round(os.path.getsize(path) / 1e6, 1), "write_s": round(t_write, 1),
                "image_gb_in_memory": round(side * side * 2 / 1e9, 2)})
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--large", type=int, default=20000)
    ap.add_argument("--large-model", default="default", help="counter of the large image (default: default)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="end-to-end runs of each side, in the order serial, batch, batch, serial, ... (default 2)")
    ap.add_argument("--skip-ratio", action="store_true")
    ap.add_argument("--skip-startup", action="store_true")
    ap.add_argument("--skip-large", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not a.skip_startup:
            s = _startup(work)
            print("start-up, `cellsynth count` of a 256x256 image in a fresh process (two runs each):")
            for name, label in (("onnx_cached", "cached ONNX export, no torch/timm import"),
                                ("torch_timm_imported_first", "same, torch and timm imported first"),
                                ("torch_engine", "CELLSYNTH_ENGINE=torch")):
                print(f"  {label}: {' / '.join(f'{t:.1f}' for t in s[name]['seconds'])} s "
                      f"({s[name]['count']} cells, engine {s[name]['engine']})")
        if not a.skip_ratio:
            r = _ratio(a.images, work, max(1, a.rounds))
            print(f"{r['images']} images of 512x512, end to end (fresh processes, imports and model loads counted on "
                  f"both sides; mean of {len(r['serial_runs_s'])} runs each): serial {r['serial_end_to_end_s']} s "
                  f"{r['serial_runs_s']}, 2 workers {r['batch_end_to_end_s']} s {r['batch_runs_s']}")
            print(f"warm (counter loaded, workers started): serial loop {r['serial_loop_s']} s "
                  f"({r['serial_engine']}, {r['serial_threads']} threads), 2 workers {r['batch_warm_s']} s")
            print(f"ratio serial / 2 workers: {r['ratio_end_to_end']:.2f} end to end, {r['ratio_warm']:.2f} warm "
                  f"(goal >= 1.6); counts equal image by image: {r['counts_equal']} ({r['total_cells']} cells); "
                  f"torch imported by the serial process: {r['serial_torch']}, by the workers: {r['workers_torch']}")
        if not a.skip_large:
            g = _large(a.large, work, a.large_model)
            print(f"large image ({g['model']} counter) {g['side']}x{g['side']} uint16 ({g['image_gb_in_memory']} GB in memory, "
                  f"{g['file_mb']} MB tiled TIFF): {g['count']} cells in {g['chunks']} chunks, {g['seconds']} s, "
                  f"peak RSS {g['peak_rss_gb']:.2f} GB (goal <= 2 GB)")


if __name__ == "__main__":
    main()
