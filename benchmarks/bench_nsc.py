"""NSC benchmark: sparse eigensolver vs dense eigh at 8192 nodes, and whole NSC time at 512x512.

Usage::

    python benchmarks/bench_nsc.py [--grid 64] [--size 512] [--threads 1] [--skip-dense]

The joint graph of one field of view and the anchor at a 64x64 patch grid has
2 x 4096 = 8192 nodes (the paper's n_p = 4096). One run each (the dense
solve takes minutes). Prints times, their ratio and the eigenvalue agreement.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", type=int, default=64, help="patches per field-of-view side (nodes = 2 grid^2)")
    ap.add_argument("--size", type=int, default=512, help="image side for the whole-NSC timing")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-dense", action="store_true")
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))

    import numpy as np
    from threadpoolctl import threadpool_limits

    from cellsynth.stain.features import FilterBankBackbone
    from cellsynth.stain.nsc import cosine_affinity, nsc_masks, spectral_embedding
    from cellsynth.stain.params import NSCParams
    from cellsynth.stain.simulate import simulate_stain_pair

    results = {"threads": args.threads}
    with threadpool_limits(args.threads):
        img = simulate_stain_pair((args.size, args.size), rng=0).fluorescence[0].astype(np.float32)
        unit = np.clip(img / np.percentile(img, 99.8), 0, 1)
        s = args.grid * 8
        fovs = np.stack([unit[:s, :s], unit[-s:, -s:]]) if min(unit.shape) >= s else np.stack([unit, unit[::-1]])
        grid_feats = FilterBankBackbone().features(fovs, args.grid)
        feats = grid_feats.reshape(-1, grid_feats.shape[-1])
        a = cosine_affinity(feats)
        n = a.shape[0]
        t0 = time.perf_counter()
        vs, us = spectral_embedding(a, 5, solver="sparse")
        t_sparse = time.perf_counter() - t0
        results.update(nodes=n, eigsh_s=round(t_sparse, 3))
        print(f"graph of {n} nodes: eigsh (r=5) {t_sparse:.2f} s", flush=True)
        if not args.skip_dense:
            from scipy.linalg import eigh

            d = a.sum(1)
            m = a / np.sqrt(np.outer(d, d))
            t0 = time.perf_counter()
            vals_all = eigh(m, eigvals_only=False)[0]  # the full dense decomposition
            t_dense = time.perf_counter() - t0
            top = 1.0 - np.sort(vals_all)[::-1][1:6]
            results.update(dense_eigh_s=round(t_dense, 2), ratio=round(t_dense / t_sparse, 1),
                           max_eigenvalue_diff=float(np.abs(top - vs).max()))
            print(f"dense eigh (all {n} eigenpairs) {t_dense:.1f} s; ratio {t_dense / t_sparse:.0f}x; "
                  f"max eigenvalue difference {np.abs(top - vs).max():.2e}", flush=True)
        t0 = time.perf_counter()
        res = nsc_masks(img, params=NSCParams())
        t_nsc = time.perf_counter() - t0
        fovs_n = int(np.ceil(args.size / NSCParams().fov)) ** 2
        results.update(nsc_image=args.size, nsc_s=round(t_nsc, 2), nsc_fovs=fovs_n,
                       nsc_foreground_fraction=round(float(res.foreground.mean()), 3))
        print(f"whole NSC of a {args.size}x{args.size} image (filter bank, k=r=5, {fovs_n} fields of view of "
              f"{NSCParams().fov} px, {2 * NSCParams().grid ** 2} nodes each): {t_nsc:.1f} s", flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
