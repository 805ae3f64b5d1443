"""Train the demo staining model shipped in ``resources/models/stain-demo``.

Reproduce it with::

    python -m cellsynth.tools.train_demo --out resources/models/stain-demo

Data: simulated brightfield / fluorescence pairs (:mod:`cellsynth.stain.simulate`),
128x128 pixels, ``--n-train`` fields of view for training (seeds ``[seed, i]``) and
``--n-val`` held-out ones from a different base seed. Model: a small UNet2DModel
(32-64-128 channels, one residual block per level, attention in the middle
block), v-prediction, 2000-step linear schedule (betas 1e-6 -> 0.01 as in the
paper), trained on 64x64 crops with flips/rotations on CPU within a wall-clock
budget (``--minutes``). Every epoch is saved (EMA weights, float16
safetensors); ``--resume`` continues. At the end the held-out pairs are
evaluated with DDIM-50 with and without mask guidance and a README.md with the
data, command, time and metrics is written next to the weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from .. import io
from ..stain.params import DEMO_MODEL

VAL_SEED = 1_000_003


def _readme(out: Path, doc: dict) -> None:
    t = doc["training"]
    ev = t.get("final", {})

    def row(name, m):
        a = m["average"]
        return f"| {name} | {a['mse']:.4f} | {a['mae']:.4f} | {a['pcc']:.3f} | {a['ssim']:.3f} |"

    lines = [
        "# stain-demo: a small DiffStain model trained on simulated pairs",
        "",
        "Default model of the *Virtual staining* widget and of `cellsynth evaluate-stain --model default`.",
        "It only knows the project's simulated cells (`cellsynth simulate-stain-pairs`); train your own",
        "model on real paired data with `cellsynth train-stain`.",
        "",
        "- Data: simulated brightfield (3 focus planes) / fluorescence (DNA, ER, RNA, AGP, Mito) pairs, "
        f"128x128 px: {t['n_fovs']} training fields of view (seed {t.get('seed', 0)}), "
        f"{ev.get('n', 0)} held-out ones (seed {VAL_SEED}).",
        f"- Command: `{t.get('command', 'python -m cellsynth.tools.train_demo --out resources/models/stain-demo')}`",
        f"- Training: {t['steps']} steps of batch {t['config']['batch_size']} ({t['epochs']} epochs), "
        f"64x64 crops, {t['seconds'] / 60:.1f} min on {t.get('device', 'CPU')}, torch threads: {t.get('threads', 1)}.",
        f"- Model: UNet2DModel {DEMO_MODEL['block_out_channels']}, {DEMO_MODEL['layers_per_block']} block per level, "
        "mid-block attention, v-prediction, linear betas 1e-6..0.01 over 2000 steps; EMA weights stored as float16.",
        "- Licence: BSD-3-Clause (weights produced by this project).",
        "",
    ]
    if ev:
        lines += ["Held-out metrics (normalised intensity [0, 1]; DDIM, eta 0):", "",
                  "| sampler | MSE | MAE | PCC | SSIM |", "|---|---|---|---|---|"]
        for key, name in (("no_guidance", "DDIM-50, no mask guidance"), ("guidance", "DDIM-50, NSC mask guidance")):
            if key in ev:
                lines.append(row(name, ev[key]))
        lines += ["", "Per channel (DDIM-50, no guidance): " + ", ".join(
            f"{n} PCC {m['pcc']:.3f}" for n, m in ev.get("no_guidance", {}).get("channels", {}).items()), ""]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="resources/models/stain-demo")
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "cellsynth-stain-demo-data"))
    ap.add_argument("--minutes", type=float, default=40.0)
    ap.add_argument("--epochs", type=int, default=1000)
    ap.add_argument("--steps-per-epoch", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--n-train", type=int, default=300)
    ap.add_argument("--n-val", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--eval-only", action="store_true", help="only evaluate the model in --out and rewrite README.md")
    ap.add_argument("--smoke", action="store_true", help="a tiny run to check the script")
    args = ap.parse_args(argv)

    import torch

    from ..progress import tqdm_callback
    from ..stain.metrics import evaluate_stain
    from ..stain.pipeline_stain import load_stain_model
    from ..stain.params import StainParams
    from ..stain.simulate import simulate_stain_pairs
    from ..stain.train import TrainConfig, train_stain

    torch.set_num_threads(args.threads)
    out, data = Path(args.out), Path(args.data)
    if args.smoke:
        args.n_train, args.n_val, args.epochs, args.steps_per_epoch, args.minutes = 4, 2, 2, 2, 0
    train_dir, val_dir = data / f"train-{args.n_train}-{args.seed}", data / f"val-{args.n_val}"
    if not (train_dir / "stain_pairs.json").exists():
        print(f"simulating {args.n_train} training pairs in {train_dir}", file=sys.stderr)
        simulate_stain_pairs(train_dir, args.n_train, seed=args.seed, overwrite=True)
    if not (val_dir / "stain_pairs.json").exists():
        simulate_stain_pairs(val_dir, args.n_val, seed=VAL_SEED, overwrite=True)

    def validate(pipe, epoch):
        if epoch % 5 and not args.smoke:
            return None
        return evaluate_stain(val_dir, pipe, params=StainParams(steps=10, guidance=False), limit=4)["average"]

    if not args.eval_only:
        cfg = TrainConfig(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
                          crop=64, lr=args.lr, ema_decay=0.995, seed=args.seed, minutes=args.minutes, device="cpu",
                          save_dtype="float16", model=DEMO_MODEL)
        callback, close = tqdm_callback()
        try:
            res = train_stain(train_dir, out, config=cfg, resume=args.resume, progress=callback, validate=validate)
        finally:
            close()
        print(f"trained {res.steps} steps in {res.seconds / 60:.1f} min ({res.stopped}); last loss {res.losses[-1]:.4f}",
              file=sys.stderr)

    # final held-out evaluation, with and without mask guidance
    doc = io.read_json(out / "config.json")
    pipe = load_stain_model(out, device="cpu")
    final = {}
    for key, guidance in (("no_guidance", False), ("guidance", True)):
        t0 = time.time()
        steps = 3 if args.smoke else 50
        final[key] = evaluate_stain(val_dir, pipe, params=StainParams(steps=steps, guidance=guidance))
        final[key]["seconds"] = round(time.time() - t0, 1)
        print(key, json.dumps(final[key]["average"]), file=sys.stderr)
    final["n"] = final["no_guidance"]["n"]
    doc["training"].update(final=final, seed=args.seed, threads=args.threads, device="CPU",
                           command="python -m cellsynth.tools.train_demo --out resources/models/stain-demo")
    io.write_json(out / "config.json", doc, overwrite=True)
    _readme(out, doc)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
