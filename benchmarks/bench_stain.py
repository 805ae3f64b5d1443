"""Staining benchmark: DDIM-50 vs DDPM with the full 2000-step schedule on the same model.

Usage::

    python benchmarks/bench_stain.py [--model default] [--n 3] [--size 64] [--threads 1]

Stains ``n`` held-out simulated pairs (seeds never used for training the demo
model) with both samplers, without mask guidance, and prints the time ratio and
the average-PCC difference. DDPM-2000 runs 2000 UNet calls per tile, so on a
CPU only a few small images are measured.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--guidance", action="store_true", help="also time both samplers with mask guidance")
    args = ap.parse_args()

    import numpy as np
    import torch

    from cellsynth.stain.metrics import stain_metrics
    from cellsynth.stain.model import load_stain_model, to_unit
    from cellsynth.stain.params import StainParams
    from cellsynth.stain.simulate import simulate_stain_pair
    from cellsynth.tools.train_demo import VAL_SEED

    torch.set_num_threads(args.threads)
    pipe = load_stain_model(args.model, device="cpu")
    cfg = pipe.config
    settings = {"ddim": StainParams(scheduler="ddim", steps=args.steps, guidance=False),
                "ddpm": StainParams(scheduler="ddpm", guidance=False)}
    if args.guidance:
        settings["ddim+guidance"] = StainParams(scheduler="ddim", steps=args.steps, guidance=True)
        settings["ddpm+guidance"] = StainParams(scheduler="ddpm", guidance=True)
    times = {k: [] for k in settings}
    pccs = {k: [] for k in settings}
    for i in range(args.n):
        pair = simulate_stain_pair((args.size, args.size), rng=[VAL_SEED, 10_000 + i])
        target = to_unit(pair.fluorescence, cfg.target_norm)
        for key, params in settings.items():
            t0 = time.perf_counter()
            out = pipe(pair.brightfield, params=params)
            times[key].append(time.perf_counter() - t0)
            pccs[key].append(stain_metrics(out.images, target, cfg.channel_names)["average"]["pcc"])
            print(f"image {i}: {key:14s} {times[key][-1]:7.1f} s  PCC {pccs[key][-1]:.3f}", flush=True)
    summary = {k: {"seconds_per_image": round(float(np.mean(times[k])), 2), "pcc": round(float(np.mean(pccs[k])), 4)}
               for k in settings}
    ratio = summary["ddpm"]["seconds_per_image"] / summary["ddim"]["seconds_per_image"]
    diff = summary["ddim"]["pcc"] - summary["ddpm"]["pcc"]
    print(f"DDPM-{cfg.num_train_timesteps} / DDIM-{args.steps} time ratio: {ratio:.1f}x; "
          f"PCC DDIM - DDPM: {diff:+.4f} over {args.n} images of {args.size}x{args.size}")
    print(json.dumps({"n": args.n, "size": args.size, "threads": args.threads, "samplers": summary,
                      "time_ratio": round(ratio, 2), "pcc_difference": round(diff, 4)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
