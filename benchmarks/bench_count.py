"""Counting speed: a 2048x2048 image with the shipped default counter, onnxruntime vs PyTorch on the CPU.

Prints
- the time to count one 2048x2048 image (uint16, ~4000 cells) with
  ``count_cells(image, diameter=15)`` (the product's default engine: onnxruntime
  on the CPU when installed), best of ``--repeat`` runs (goal <= 2 s on 2 CPU
  cores), and with the diameter estimated (the default);
- the same with ``engine="torch"`` (PyTorch eager) and the ratio torch /
  default, both measured in this run (alternating runs, best of each);
- the count against the true number of cells (both engines must agree).

Run: ``python benchmarks/bench_count.py [--device cpu] [--size 2048] [--repeat 3] [--tile 256]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cellsynth.count import count_cells, load_counter
from cellsynth.layouts import LayoutParams, generate_layout


def _interleaved(fns, repeat: int):
    """Best time of each function over ``repeat`` rounds, run alternately (fair on a busy machine)."""
    best, outs = [float("inf")] * len(fns), [None] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            outs[i] = fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model", default="default")
    ap.add_argument("--tile", type=int, default=256)
    a = ap.parse_args()

    import torch

    n = a.size
    params = LayoutParams(shape=(n, n), count_mean=4000 * (n / 2048) ** 2, count_std=0, count_max=100000,
                          clusters=(20, 20), cluster_spread=0.25)
    lay = generate_layout(params, rng=0)
    image = (lay.image.astype(np.uint16) * 16)  # a 12-bit-like camera image
    counter = load_counter(a.model, device=a.device)
    count_cells(image[:512, :512], counter=counter)  # warm-up (and the export for onnxruntime)
    count_cells(image[:512, :512], counter=counter, engine="torch")

    tile = a.tile
    (t_default, t_torch, t_auto), (res, res_t, res_auto) = _interleaved(
        [lambda: count_cells(image, counter=counter, diameter=15.0, tile=tile),
         lambda: count_cells(image, counter=counter, diameter=15.0, tile=tile, engine="torch"),
         lambda: count_cells(image, counter=counter, tile=tile)],
        a.repeat,
    )
    print(f"device: {counter.device} ({torch.get_num_threads()} threads), model: {counter.name} ({counter.kind}), "
          f"tile {tile}")
    print(f"image: {n}x{n} uint16, true cells: {lay.n_cells}")
    print(f"count (diameter 15 given): {res.count}  density sum: {res.density_sum:.1f}  "
          f"relative error: {100 * (res.count - lay.n_cells) / lay.n_cells:+.2f}%")
    print(f"count (diameter auto: {res_auto.meta['diameter_used']:.1f} px): {res_auto.count}")
    print(f"time to count {n}x{n}, diameter given, engine {res.meta['engine']}: {t_default:.2f} s  "
          "(goal <= 2 s on 2 cores)")
    print(f"time with the diameter estimated (the default):            {t_auto:.2f} s")
    print(f"time with engine torch (PyTorch eager):                    {t_torch:.2f} s")
    print(f"ratio torch / {res.meta['engine']}: {t_torch / t_default:.2f}x")
    assert res.count == res_t.count, "the engines disagree"


if __name__ == "__main__":
    main()
