"""Syn-HC layouts: Table 1 statistics and generation speed.

Prints
- the mean and std of placed cell counts over 500 default 256x256 layouts against the
  InST-Microscopy paper's Table 1 (101.32 +- 76.43), with the relative differences;
- the share of layouts at the smallest count (no pile-up at a bound);
- placed against requested counts when many cells are asked (until the image is full);
- the time per 256x256 layout with ~100 cells, and its ratio to a straightforward reference
  that evaluates every candidate ellipse over the full frame (same candidates; the reference
  lacks the fallback for crowded clusters, so counts agree where no cluster was crowded),
  both measured in this run.

Run: ``python benchmarks/bench_layouts.py`` (single-threaded numpy work; one core).
"""

from __future__ import annotations

import time

import numpy as np

from cellsynth.layouts import LayoutParams, generate_layout
from cellsynth.layouts.generate import requested_count

PAPER_MEAN, PAPER_STD = 101.32, 76.43


def reference_layout(params: LayoutParams, rng) -> np.ndarray:
    """Per-cell full-frame reference: the same sampling, every ellipse evaluated on the whole image."""
    rng = np.random.default_rng(rng)
    rows, cols = params.shape
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    labels = np.zeros(params.shape, np.uint16)
    n_target = requested_count(params, rng)
    n_clusters = int(rng.integers(params.clusters[0], params.clusters[1] + 1))
    centres = rng.uniform((0, 0), (rows, cols), size=(n_clusters, 2))
    spread = params.cluster_spread * min(rows, cols)
    half = params.cell_size / 2.0
    lo, hi = 1.0 - params.axis_jitter, 1.0 + params.axis_jitter
    m = n_target * params.max_tries
    which = rng.integers(0, n_clusters, size=n_target)
    offsets = rng.normal(0.0, spread, size=(m, 2))
    radii = half * rng.uniform(lo, hi, size=(m, 2))
    angles = rng.uniform(-np.pi, np.pi, size=m) if params.rotation else np.zeros(m)
    rng.uniform(params.intensity[0], params.intensity[1], size=n_target)
    k = 0
    for i in range(n_target):
        for t in range(i * params.max_tries, (i + 1) * params.max_tries):
            r, c = centres[which[i]] + offsets[t]
            if not (0 <= r < rows and 0 <= c < cols) or labels[int(r), int(c)]:
                continue
            dy, dx = yy - r, xx - c
            ca, sa = np.cos(angles[t]), np.sin(angles[t])
            u = (dy * ca + dx * sa) / radii[t, 0]
            v = (dx * ca - dy * sa) / radii[t, 1]
            mask = u * u + v * v <= 1.0
            mask[int(r), int(c)] = True
            under = labels[mask]
            if np.count_nonzero(under) > params.max_overlap * under.size:
                continue
            k += 1
            labels[mask & (labels == 0)] = k
            break
    return labels


def main() -> None:
    counts = np.array([generate_layout(rng=10_000 + i).n_cells for i in range(500)])
    mean, std = counts.mean(), counts.std()
    print(f"Table 1 over 500 layouts: {mean:.2f} +- {std:.2f} cells "
          f"(paper {PAPER_MEAN} +- {PAPER_STD}; mean {100 * (mean / PAPER_MEAN - 1):+.1f}%, "
          f"std {100 * (std / PAPER_STD - 1):+.1f}%); {100 * np.mean(counts == counts.min()):.1f}% of "
          f"layouts at the smallest count ({counts.min()}), largest {counts.max()}")
    for asked in (150, 200, 300, 600):
        got = [generate_layout(LayoutParams(count_mean=asked, count_std=0), rng=s).n_cells for s in range(5)]
        print(f"asked {asked} cells on 256x256: placed {np.mean(got):.0f} (min {min(got)}, max {max(got)})")

    params = LayoutParams(count_mean=100, count_std=0)
    seeds = range(60)
    placed = [generate_layout(params, rng=s).n_cells for s in seeds]  # warm-up and cell counts
    t0 = time.perf_counter()
    for s in seeds:
        generate_layout(params, rng=s)
    fast = (time.perf_counter() - t0) / len(seeds)
    t0 = time.perf_counter()
    same = 0
    for s in seeds:
        ref = reference_layout(params, s)
        same += int(ref.max() == placed[s])
    slow = (time.perf_counter() - t0) / len(seeds)
    print(f"256x256 layout with {np.mean(placed):.0f} cells: {1000 * fast:.2f} ms "
          f"(reference per-cell full-frame geometry only: {1000 * slow:.2f} ms; "
          f"speed-up {slow / fast:.1f}x; same cell count in {same}/{len(seeds)} layouts)")


if __name__ == "__main__":
    main()
