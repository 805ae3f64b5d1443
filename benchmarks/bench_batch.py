"""Batch counting on dask.distributed: 2 local workers vs a serial loop, and the memory of a large image.

Prints
- ``ratio``: the time of a serial loop (read the image, ``count_cells`` with the
  shipped default counter and the diameter estimated, as ``cellsynth count``
  does, one image after the other in this process) divided by the time of
  ``count_batch`` on a 2-worker ``LocalCluster`` (one thread each), on
  ``--images`` generated 512x512 uint16 TIFFs (goal >= 1.6 on 2 cores).
  Both are timed warm (counter loaded, workers started) and the batch also end
  to end (cluster start, model loads, table and plot included); the counts of
  the two must be equal image by image;
- the peak resident memory (RSS) of a separate process that counts a
  ``--large`` x ``--large`` uint16 tiled TIFF with ``count_large`` (never read
  whole; goal <= 2 GB for 20000 x 20000), with its count and time.

Run: ``python benchmarks/bench_batch.py [--images 100] [--large 20000] [--skip-ratio] [--skip-large]``.
The machine's other load changes the times: compare the ratio, measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _synthetic_uint16(shape, seed, diameter=(14.0, 16.0)) -> np.ndarray:
    from cellsynth.count.synth import SynthParams, synthetic_nuclei

    img, _, _ = synthetic_nuclei(SynthParams(shape=shape, diameter=diameter, coverage=(0.1, 0.35)), rng=seed)
    return (np.clip(img, 0, 4) / 4 * 60000).astype(np.uint16)


def _ratio(n_images: int, workdir: Path) -> dict:
    import tifffile

    from cellsynth.batch import BatchParams, cluster_client, count_batch
    from cellsynth.count import count_cells, load_counter
    from cellsynth.count.data import read_image_axes

    folder = workdir / "images"
    folder.mkdir()
    for i in range(n_images):
        tifffile.imwrite(folder / f"field_{i:03d}.tif", _synthetic_uint16((512, 512), i))
    paths = sorted(folder.glob("*.tif"))

    counter = load_counter("default", device="cpu")
    count_cells(read_image_axes(paths[0])[0], counter=counter)  # warm-up
    t0 = time.perf_counter()
    serial = {}
    for p in paths:
        image, ch = read_image_axes(p)
        serial[p.name] = count_cells(image, counter=counter, channel_axis=ch).count
    t_serial = time.perf_counter() - t0

    params = BatchParams(model="default", device="cpu")
    t0 = time.perf_counter()
    cold = count_batch([folder], workdir / "cold", params=params, workers=2)
    t_cold = time.perf_counter() - t0

    with cluster_client("local", workers=2) as client:
        from cellsynth.batch.engine import count_plane

        # Warm each worker: torch imported and the counter loaded once, as after the first plane.
        for w in client.scheduler_info(n_workers=-1)["workers"]:
            client.submit(count_plane, str(paths[0]), (), params, workers=[w], pure=False).result()
        t0 = time.perf_counter()
        warm = count_batch([folder], workdir / "warm", params=params, scheduler=client)
        t_warm = time.perf_counter() - t0
    batch = {Path(r["image"]).name: r["count"] for r in warm.rows}
    cold_counts = {Path(r["image"]).name: r["count"] for r in cold.rows}
    return {
        "images": n_images, "serial_s": round(t_serial, 2), "batch_warm_s": round(t_warm, 2),
        "batch_end_to_end_s": round(t_cold, 2), "ratio_warm": round(t_serial / t_warm, 3),
        "ratio_end_to_end": round(t_serial / t_cold, 3), "torch_threads_serial": _torch_threads(),
        "counts_equal": batch == serial and cold_counts == serial,
        "total_cells": int(sum(serial.values())),
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


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
    ap.add_argument("--skip-ratio", action="store_true")
    ap.add_argument("--skip-large", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not a.skip_ratio:
            r = _ratio(a.images, work)
            print(f"{r['images']} images of 512x512: serial {r['serial_s']} s ({r['torch_threads_serial']} torch "
                  f"threads), 2 workers {r['batch_warm_s']} s warm / {r['batch_end_to_end_s']} s end to end")
            print(f"ratio serial / 2 workers: {r['ratio_warm']:.2f} warm, {r['ratio_end_to_end']:.2f} end to end "
                  f"(goal >= 1.6); counts equal image by image: {r['counts_equal']} ({r['total_cells']} cells)")
        if not a.skip_large:
            g = _large(a.large, work, a.large_model)
            print(f"large image ({g['model']} counter) {g['side']}x{g['side']} uint16 ({g['image_gb_in_memory']} GB in memory, "
                  f"{g['file_mb']} MB tiled TIFF): {g['count']} cells in {g['chunks']} chunks, {g['seconds']} s, "
                  f"peak RSS {g['peak_rss_gb']:.2f} GB (goal <= 2 GB)")


if __name__ == "__main__":
    main()
