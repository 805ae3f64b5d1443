"""Train the default density counter shipped in ``resources/models/counter-default``.

The shipped model was made in two stages (see its README): stage 1 is the
previous default model (this script at git revision 01d2b0f, 40 minutes from
random initialisation, on the appearance model of that revision); stage 2
fine-tunes it on today's richer appearance model::

    git show 01d2b0f:resources/models/counter-default/model.safetensors > stage1/model.safetensors
    git show 01d2b0f:resources/models/counter-default/config.json > stage1/config.json
    python -m cellsynth.tools.train_default --out resources/models/counter-default --init stage1 \
        --minutes 45 --lr 1e-3        # then the same with --resume --minutes 75 (budget extended)

The saved config also carries the default :class:`~cellsynth.count.objects.ObjectParams`:
counting reconciles the network's peaks with the image's foreground objects.

Training data are generated on the fly: Syn-HC layouts (clustered, touching and
overlapping ellipses, 9-24 px cells, from empty to densely packed) rendered with
strong appearance randomisation (:mod:`cellsynth.count.synth`). Each epoch draws
a fresh pool of 256x256 images (normalised whole, as at inference) and trains on
random 128x128 crops with flips and rotations, 8 per batch. The network is
:class:`~cellsynth.count._nets.DensityNet`: the stem and first 4 blocks of
EfficientNet-B0 (strides 2-16, random init) and a light decoder, about 0.4 M
parameters (0.8 MB in float16). The learning rate follows a cosine over a
wall-clock budget (``--minutes``), so the run ends on time on a busy machine
(a time-based schedule makes runs on machines of different speed differ in the
number of steps, which the config records). After every epoch
the model is evaluated on held-out images (seeds never used for training) and
the best model so far is written (float16 safetensors + config.json), so a
stopped run is usable; ``--resume`` continues from the last checkpoint.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .. import io
from ..count.models import counter_config, save_counter
from ..count.objects import ObjectParams
from ..count.synth import SynthParams, synthetic_nuclei
from ..count.targets import density_target, random_crop

VAL_SEED_OFFSET = 1_000_003


def held_out_set(n: int, *, seed: int = 0, shape=(256, 256)):
    """``n`` held-out synthetic images ``(image, centres)`` from seeds never used for training."""
    params = SynthParams(shape=shape)
    return [synthetic_nuclei(params, rng=[seed + VAL_SEED_OFFSET, i])[:2] for i in range(n)]


def _pool(rng: np.random.Generator, n: int, cfg: dict, params: SynthParams):
    out = []
    for _ in range(n):
        img, centres, _ = synthetic_nuclei(params, rng=rng)
        out.append((img, density_target(centres, img.shape, sigma=cfg["sigma"], scale=cfg["density_scale"])))
    return out


def evaluate_images(net, images, cfg: dict, *, batch_size: int = 8) -> dict:
    """MAE, RMSE and mean relative error of whole-image density sums (images' sides multiples of 16)."""
    import torch

    net.eval()
    preds, trues = [], []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            x = torch.from_numpy(np.stack([im for im, _ in chunk])[:, None]).contiguous(memory_format=torch.channels_last)
            preds.extend((net(x).sum(dim=(1, 2, 3)) / cfg["density_scale"]).tolist())
            trues.extend(len(c) for _, c in chunk)
    p, t = np.array(preds), np.array(trues, float)
    err = p - t
    return {
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err ** 2).mean())),
        "mean_rel_error": float((np.abs(err) / np.maximum(t, 1)).mean()),
        "bias": float(err.mean()),
        "mean_count": float(t.mean()),
    }


def train_default(
    out: str | Path,
    *,
    minutes: float = 40.0,
    seed: int = 0,
    batch_size: int = 8,
    crop: int = 128,
    steps_per_epoch: int = 150,
    pool: int = 128,
    n_val: int = 48,
    lr: float = 2e-3,
    backbone: str = "efficientnet_b0",
    blocks: int = 4,
    max_epochs: Optional[int] = None,
    resume: bool = False,
    threads: Optional[int] = None,
    checkpoint_dir: Optional[str | Path] = None,
    init: Optional[str | Path] = None,
) -> dict:
    """Train the default counter; returns the best held-out metrics. See the module docstring."""
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    out = Path(out)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else out / "checkpoint"
    cfg = counter_config("density", backbone=backbone, blocks=blocks, objects=ObjectParams().to_dict())
    params = SynthParams(shape=(256, 256))
    torch.manual_seed(seed)
    net, opt, state = _start(cfg, ckpt_dir, init=init, resume=resume, blocks=blocks, lr=lr)
    rng = np.random.default_rng([seed, state["epoch"]])
    command = "python -m cellsynth.tools.train_default --out resources/models/counter-default"
    if init is not None:
        command += f" --init {init} --minutes {minutes:g} --lr {lr:g}"
    val = held_out_set(n_val, seed=seed)
    budget = minutes * 60.0
    start = time.time() - state["elapsed"]
    print(f"training density counter ({backbone}, {blocks} blocks, {sum(p.numel() for p in net.parameters()) / 1e6:.2f}"
          f" M parameters) for {minutes:g} min; held-out set: {n_val} images, mean "
          f"{np.mean([len(c) for _, c in val]):.1f} cells", flush=True)
    while True:
        elapsed = time.time() - start
        if elapsed >= budget or (max_epochs is not None and state["epoch"] >= max_epochs):
            break
        epoch = state["epoch"] + 1
        data = _pool(rng, pool, cfg, params)
        losses, cur = _epoch(net, opt, data, rng, cfg, start=start, budget=budget, lr=lr, crop=crop,
                             batch_size=batch_size, steps_per_epoch=steps_per_epoch)
        if not losses:  # the budget ran out before this epoch's first step
            break
        metrics = evaluate_images(net, val, cfg)
        state["epoch"] = epoch
        state["steps"] = state.get("steps", 0) + len(losses)
        state["elapsed"] = time.time() - start
        record = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else None,
                  "minutes": state["elapsed"] / 60, "lr": cur, **metrics}
        state["history"].append(record)
        improved = metrics["mae"] < state["best_mae"]
        print(f"epoch {epoch:3d}  {state['elapsed'] / 60:5.1f} min  loss {record['loss']:.4f}  held-out MAE "
              f"{metrics['mae']:.2f}  RMSE {metrics['rmse']:.2f}  rel {100 * metrics['mean_rel_error']:.1f}%  "
              f"bias {metrics['bias']:+.2f}{'  *' if improved else ''}", flush=True)
        save_counter(net, cfg, ckpt_dir, overwrite=True)
        with io.atomic_path(ckpt_dir / "optimizer.pt", overwrite=True) as tmp:
            torch.save(opt.state_dict(), str(tmp))
        if improved:
            state["best_mae"] = metrics["mae"]
            final = dict(cfg)
            final["name"] = "counter-default"
            final["training"] = {
                "command": command, "init": None if init is None else str(init), "data": _DATA.format(crop=crop),
                "seed": seed, "epoch": epoch, "steps": state["steps"], "minutes": round(state["elapsed"] / 60, 2),
                "budget_minutes": minutes, "threads": torch.get_num_threads(), "crop": crop, "lr": lr,
                "batch_size": batch_size, "steps_per_epoch": steps_per_epoch,
                "held_out": {k: round(v, 4) for k, v in metrics.items()}, "n_held_out": n_val}
            save_counter(net, final, out, half=True, overwrite=True)
        io.write_json(ckpt_dir / "state.json", state, overwrite=True)
    best = min(state["history"], key=lambda r: r["mae"]) if state["history"] else {}
    print(f"done: {state['epoch']} epochs in {state['elapsed'] / 60:.1f} min; best held-out {best}", flush=True)
    return best


_DATA = "synthetic nuclei (cellsynth.count.synth.SynthParams defaults), 256x256, random {crop}x{crop} crops"


def _start(cfg: dict, ckpt_dir: Path, *, init, resume: bool, blocks: int, lr: float):
    """``(network, optimiser, state)``: new, from ``init``'s weights, or resumed from the checkpoint."""
    import torch

    from ..count._nets import build_net

    net = build_net(cfg).to(memory_format=torch.channels_last)
    if init is not None and not resume:
        from ..count.models import load_counter

        start = load_counter(init, device="cpu")
        if start.config.get("kind") != "density" or start.config.get("blocks") != blocks:
            raise ValueError(f"--init {init} is not a density counter with {blocks} blocks")
        net.load_state_dict({k: v.float() for k, v in start.net.state_dict().items()})
        print(f"starting from the weights of {init} ({start.sha256})", flush=True)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    state = {"epoch": 0, "elapsed": 0.0, "best_mae": math.inf, "history": [], "steps": 0}
    if resume and (ckpt_dir / "state.json").is_file():
        from safetensors.torch import load_file

        net.load_state_dict(load_file(str(ckpt_dir / "model.safetensors")))
        opt.load_state_dict(torch.load(str(ckpt_dir / "optimizer.pt"), weights_only=True))
        state = io.read_json(ckpt_dir / "state.json")
        print(f"resumed at epoch {state['epoch']} ({state['elapsed'] / 60:.1f} min done)", flush=True)
    return net, opt, state


def _epoch(net, opt, data, rng, cfg: dict, *, start: float, budget: float, lr: float, crop: int, batch_size: int,
           steps_per_epoch: int) -> tuple[list, float]:
    """One epoch of random crops of ``data`` (warm-up then cosine learning rate over the budget);
    ``(losses, last learning rate)``."""
    import torch

    from ..count._nets import density_loss

    warmup = 0.03 * budget
    net.train()
    losses, cur = [], lr
    for _ in range(steps_per_epoch):
        frac = (time.time() - start) / budget
        if frac >= 1:
            break
        cur = lr * min(1.0, (frac * budget + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        for g in opt.param_groups:
            g["lr"] = cur
        idx = rng.integers(0, len(data), size=batch_size)
        xs, ys = zip(*(random_crop(data[i][0], data[i][1], crop, rng=rng) for i in idx))
        x = torch.from_numpy(np.stack(xs)[:, None]).contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(np.stack(ys)[:, None])
        loss = density_loss(net(x), y, scale=cfg["density_scale"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, cur


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cellsynth.tools.train_default", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (model.safetensors, config.json, checkpoint/)")
    ap.add_argument("--minutes", type=float, default=40.0, help="wall-clock training budget (default 40)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--steps-per-epoch", type=int, default=150)
    ap.add_argument("--pool", type=int, default=128, help="images generated per epoch")
    ap.add_argument("--val", type=int, default=48, help="held-out images")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--backbone", default="efficientnet_b0")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--max-epochs", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--checkpoint-dir", default=None, help="per-epoch checkpoint folder (default OUT/checkpoint)")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint folder")
    ap.add_argument("--init", default=None, help="start from this density counter's weights (a model folder)")
    a = ap.parse_args(argv)
    train_default(
        a.out, minutes=a.minutes, seed=a.seed, batch_size=a.batch_size, crop=a.crop,
        steps_per_epoch=a.steps_per_epoch, pool=a.pool, n_val=a.val, lr=a.lr, backbone=a.backbone,
        blocks=a.blocks, max_epochs=a.max_epochs, resume=a.resume, threads=a.threads,
        checkpoint_dir=a.checkpoint_dir, init=a.init,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
