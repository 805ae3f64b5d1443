"""Training and evaluating counters: the paper's strategies, metrics, checkpoints, resume.

Strategies (from the InST-Microscopy paper's counting experiments):

``supervised``
    Batches from the labelled training images only.
``finetune``
    ``pretrain_epochs`` epochs on the synthetic images, then all layers on the
    labelled (real) images. Starting from a trained counter (``init``) with
    ``pretrain_epochs=0`` fine-tunes that counter.
``dual``
    Each batch is half labelled real images, half synthetic images.
``cutmix``
    The paper's "DACS + CutMix" row (and what the public code calls DACS): dual
    batches in which each sample, with probability ``cutmix_p``, gets a box of
    area fraction ~ Beta(alpha, alpha) pasted from a sample of the other
    domain; the target is recomputed by applying the same cut to both sets of
    cell centres (:func:`cellsynth.count.targets.cutmix`). No teacher, no
    pseudo-labels.
``pseudo-label``
    Domain adaptation to unlabelled images: a supervised loss on labelled
    (synthetic and real) crops, plus a loss on unlabelled crops mixed by CutMix
    with labelled crops, whose unlabelled part is labelled by an EMA teacher's
    density peaks (weighted by the share of confident peaks), as in DACS
    (Tranheden et al., 2021). Density counters only. The name ``dacs`` is
    refused because the paper uses it for ``cutmix``.

torch is imported inside the functions.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .. import io
from ..progress import ProgressCallback, report
from .data import sample_crop, split_items
from .metrics import _as_items, evaluate_counter
from .models import Counter, counter_config, load_counter, save_counter, to_device
from .targets import cutmix, density_target
from .train_config import STRATEGIES, TrainConfig, TrainResult

__all__ = ["TrainConfig", "TrainResult", "train_counter", "ema_update", "STRATEGIES"]

def ema_update(teacher, student, decay: float) -> None:
    """Move ``teacher`` towards ``student``: ``t = decay * t + (1 - decay) * s`` (integer buffers copied)."""
    import torch

    with torch.no_grad():
        for pt, ps in zip(teacher.state_dict().values(), student.state_dict().values()):
            if pt.dtype.is_floating_point:
                pt.mul_(decay).add_(ps.detach(), alpha=1 - decay)
            else:
                pt.copy_(ps)


# ----------------------------------------------------------------------------- batches

class _Batcher:
    """Draws training batches for one strategy; targets are built from exact centres."""

    def __init__(self, cfg: TrainConfig, real, synthetic, unlabelled, rng: np.random.Generator):
        self.cfg, self.real, self.syn, self.unl, self.rng = cfg, real, synthetic, unlabelled, rng

    def _crop(self, items):
        it = items[int(self.rng.integers(0, len(items)))]
        return sample_crop(it, self.cfg.crop, self.rng)

    def _target(self, centres):
        if self.cfg.kind == "regression":
            return np.float32(len(centres))
        return density_target(centres, (self.cfg.crop, self.cfg.crop), sigma=self.cfg.sigma, scale=self.cfg.density_scale)

    def labelled(self, epoch: int):
        cfg, b = self.cfg, self.cfg.batch_size
        if cfg.strategy == "finetune":
            sources = [self.syn if epoch <= cfg.pretrain_epochs and self.syn else self.real] * b
        elif cfg.strategy in ("dual", "cutmix") and self.syn:
            sources = [self.real if i % 2 == 0 else self.syn for i in range(b)]
        elif cfg.strategy == "pseudo-label":
            pool = (self.real or []) + (self.syn or [])
            sources = [pool] * b
        else:
            sources = [self.real] * b
        xs, ys = [], []
        for i, src in enumerate(sources):
            img, cen = self._crop(src)
            if cfg.strategy == "cutmix":
                other = self.syn if src is self.real and self.syn else self.real
                img_b, cen_b = self._crop(other)
                img, cen, _ = cutmix(img, cen, img_b, cen_b, alpha=cfg.cutmix_alpha, p=cfg.cutmix_p, rng=self.rng)
            xs.append(img)
            ys.append(self._target(cen))
        return np.stack(xs)[:, None], np.stack(ys)[:, None] if cfg.kind == "density" else np.array(ys)


def _lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Step-decayed learning rate of ``epoch`` (1-based).

    With ``finetune`` the schedule restarts at the first fine-tuning epoch: the
    stage on labelled images starts at ``lr`` again, whatever the length of the
    synthetic pretraining stage.

    Examples
    --------
    >>> cfg = TrainConfig(strategy="finetune", epochs=60, pretrain_epochs=50, lr=1e-4)
    >>> _lr_at(cfg, 50) < 2e-8, _lr_at(cfg, 51)
    (True, 0.0001)
    """
    if cfg.lr_step <= 0:
        return cfg.lr
    stage_epoch = epoch
    if cfg.strategy == "finetune" and cfg.pretrain_epochs and epoch > cfg.pretrain_epochs:
        stage_epoch = epoch - cfg.pretrain_epochs
    return cfg.lr * cfg.lr_gamma ** ((stage_epoch - 1) // cfg.lr_step)


def _sane_output(net, x, cfg: TrainConfig) -> bool:
    """Whether ``net`` gives finite outputs on the batch ``x``, and (density) at most one cell per pixel."""
    import torch

    with torch.no_grad():
        pred = net(x).float()
    if not bool(torch.isfinite(pred).all()):
        return False
    if cfg.kind == "regression":
        return True
    counts = pred.sum(dim=(1, 2, 3)) / float(cfg.density_scale)
    return bool((counts.abs() <= x.shape[-2] * x.shape[-1]).all())


def _loss(net, x, y, cfg: TrainConfig, weight=None):
    import torch.nn.functional as F

    from ._nets import density_loss

    pred = net(x)
    if cfg.kind == "regression":
        return F.mse_loss(pred, y)
    if weight is None:
        return density_loss(pred, y, scale=cfg.density_scale)
    per = ((pred - y) ** 2).mean(dim=(1, 2, 3))
    return (per * weight).mean()


def _pseudo_label_batch(batcher: _Batcher, teacher, counter_cfg: dict, device, dtype):
    """Mixed batch: labelled crops with unlabelled crops pasted in, labelled by the teacher."""
    import torch

    from .infer import density_peaks

    cfg, rng = batcher.cfg, batcher.rng
    xs_t = [batcher._crop(batcher.unl)[0] for _ in range(cfg.batch_size)]
    with torch.no_grad():
        t = torch.from_numpy(np.stack(xs_t)[:, None]).to(device=device, dtype=dtype)
        dens = teacher(t).float().cpu().numpy()[:, 0] / cfg.density_scale
    xs, ys, ws = [], [], []
    pool = (batcher.real or []) + (batcher.syn or [])
    for img_t, d in zip(xs_t, dens):
        pts, scores = density_peaks(d, min_distance=0.3 * cfg.diameter, sigma=cfg.sigma, threshold=0.3)
        conf = float((scores > 0.6).mean()) if len(scores) else 1.0
        img_s, cen_s = sample_crop(pool[int(rng.integers(0, len(pool)))], cfg.crop, rng)
        img, cen, _ = cutmix(img_s, cen_s, img_t, pts, alpha=cfg.cutmix_alpha, p=1.0, rng=rng)
        xs.append(img)
        ys.append(density_target(cen, (cfg.crop, cfg.crop), sigma=cfg.sigma, scale=cfg.density_scale))
        ws.append(conf)
    return np.stack(xs)[:, None], np.stack(ys)[:, None], np.array(ws, np.float32)


def _check_training_memory(cfg: TrainConfig) -> None:
    """Refuse a run whose batches cannot fit in the memory free now, before loading anything."""
    from ..io import require_memory

    # Activations kept for the backward pass: a few hundred floats per input pixel for the
    # EfficientNet stages and the decoder; twice that with the pseudo-label batches.
    per_pixel = 4.0 * (300 if cfg.kind == "density" else 200) * (2 if cfg.strategy == "pseudo-label" else 1)
    require_memory(per_pixel * cfg.batch_size * cfg.crop * cfg.crop,
                   what=f"training on batches of {cfg.batch_size} crops of {cfg.crop}x{cfg.crop}",
                   hint="use a smaller --crop or --batch-size")


def _pretrained_file(source: str) -> tuple[str, dict]:
    """The weights file behind ``"imagenet"`` or a path, and its provenance."""
    from ..weights import REGISTRY, file_sha256, resolve

    name = "efficientnet_b0-imagenet" if source == "imagenet" else source
    where = resolve(name)
    file = where / "model.safetensors" if where.is_dir() else where
    if not file.is_file():
        raise FileNotFoundError(f"no model.safetensors in {where} (pretrained weights {source!r})")
    spec = REGISTRY.get(name)
    record = {"source": source, "file": file.name, "sha256": file_sha256(file)}
    if spec is not None:
        record.update(repo_id=spec.repo_id, revision=spec.revision, licence=spec.licence)
    return str(file), record


# ----------------------------------------------------------------------------- training

def train_counter(
    train: Any = None,
    *,
    synthetic: Any = None,
    unlabelled: Any = None,
    val: Any = None,
    out: Optional[str | Path] = None,
    config: Optional[TrainConfig] = None,
    init: Any = None,
    data_diameter: Optional[float] = None,
    device: Any = "auto",
    resume: bool = False,
    overwrite: bool = False,
    progress: Optional[ProgressCallback] = None,
) -> TrainResult:
    """Train a counter with one of the paper's strategies.

    Parameters
    ----------
    train : path or sequence, optional
        Labelled (usually real) images: a dataset folder, a folder of annotated
        images or ``(image, centres)`` pairs (see :func:`~cellsynth.count.data.load_count_data`).
    synthetic : path or sequence, optional
        Labelled synthetic images (layout or stylized datasets) for ``finetune``,
        ``dual``, ``cutmix`` and ``pseudo-label``.
    unlabelled : path or sequence, optional
        Unlabelled real images for ``pseudo-label``.
    val : path or sequence, optional
        Validation images; default: ``config.val_fraction`` of ``train``
        (of ``synthetic`` when there is no ``train``).
    out : path, optional
        Output folder: the best model (``model.safetensors`` + ``config.json``) and
        ``checkpoint/`` (last epoch, optimizer, history) for ``resume``.
    config : TrainConfig, optional
    init : str, path or Counter, optional
        Start from this counter's weights (e.g. ``"default"``); its kind and
        architecture replace those of ``config``.
    data_diameter : float, optional
        Cell diameter of the training images in pixels; images are rescaled to
        ``config.diameter`` (the counter's scale).
    device : str
    resume : bool
        Continue from ``out/checkpoint``.
    overwrite : bool
        Replace a model or training run already in ``out`` (otherwise refused,
        so that trained work is never lost by a re-run).
    progress : ProgressCallback, optional
        Called after every batch (stage ``"train"``, total = all batches of the
        run, message with the epoch, loss and validation MAE); may raise ``Cancelled``.

    Returns
    -------
    TrainResult

    Raises
    ------
    ValueError
        Missing data for the strategy, or bad settings.
    """
    import torch

    from ..device import resolve_device

    cfg = config or TrainConfig()
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(cfg).__name__}")
    _check_training_memory(cfg)
    # 1. model config and initial weights; 2. data
    cfg, mcfg, start_counter = _model_config(cfg, init)
    real, syn, unl, val_items = _training_data(cfg, train, synthetic, unlabelled, val, data_diameter)
    steps = cfg.steps_per_epoch or max(1, int(math.ceil((len(real) + len(syn)) / cfg.batch_size)))
    # 3. network, optimiser, checkpoint
    dev = resolve_device(device)
    torch.manual_seed(cfg.seed)
    net, opt, teacher = _network(cfg, mcfg, start_counter, dev)
    mcfg["training"] = {"config": cfg.to_dict(), "data_diameter": data_diameter, "n_train": len(real),
                        "n_synthetic": len(syn), "n_unlabelled": len(unl), "n_val": len(val_items)}
    out = Path(out) if out is not None else None
    ckpt = out / "checkpoint" if out is not None else None
    state = _start_state(out, ckpt, resume, overwrite, net, opt, teacher, dev)
    best_net = copy.deepcopy(net).cpu() if state["epoch"] else None
    # 4. epochs
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        batcher = _Batcher(cfg, real, syn, unl, np.random.default_rng([cfg.seed, epoch]))
        record = _epoch(net, opt, teacher, batcher, cfg, mcfg, epoch, steps, dev, state, progress)
        if val_items:
            counter = Counter(kind=mcfg["kind"], name="training", config=mcfg, net=net, device=dev, dtype=torch.float32)
            m = evaluate_counter(val_items, model=counter)
            record.update({f"val_{k}": m[k] for k in ("mae", "rmse", "acp5", "acp10", "mean_rel_error")})
        state["history"].append(record)
        score = record.get("val_mae", record["loss"])
        if state["best"] is None or score <= state["best"]["score"]:
            state["best"] = {"score": score, **record}
            best_net = copy.deepcopy(net).cpu()
            if out is not None:
                final = copy.deepcopy(mcfg)
                final["training"]["best"] = record
                save_counter(best_net, final, out, overwrite=True)
        state["epoch"] = epoch
        if ckpt is not None:
            _save_checkpoint(ckpt, net, opt, teacher, mcfg, state)
    final_cfg = copy.deepcopy(mcfg)
    if state["best"] is not None:
        final_cfg["training"]["best"] = {k: v for k, v in state["best"].items() if k != "score"}
    best = best_net if best_net is not None else net
    counter = Counter(kind=mcfg["kind"], name=str(out) if out else "trained", config=final_cfg, net=best.float().eval())
    counter = to_device(counter, device)
    if out is not None:
        from .._provenance import paths_of, record, write_into

        write_into(out, record("train-counter", inputs=paths_of(train, synthetic, unlabelled, val),
                               model={"init": str(init)} if init is not None else None,
                               parameters=dataclasses.asdict(cfg), result=final_cfg["training"].get("best")))
    return TrainResult(counter=counter, history=state["history"], best=state["best"] or {}, path=out)


def _model_config(cfg: TrainConfig, init):
    """``(cfg, model config, start counter or None)``: a new config, or the one of the counter trained on."""
    start_counter = None
    if init is not None:
        start_counter = load_counter(init, device="cpu")
        if start_counter.kind == "classic":
            raise ValueError("cannot train from the classic counter; give a trained model or none")
        if start_counter.kind != cfg.kind:
            cfg = dataclasses.replace(cfg, kind=start_counter.kind)
        mcfg = copy.deepcopy(start_counter.config)
        mcfg.pop("training", None)
        cfg = dataclasses.replace(cfg, diameter=float(mcfg.get("diameter", cfg.diameter)),
                                  sigma=float(mcfg.get("sigma", cfg.sigma)),
                                  density_scale=float(mcfg.get("density_scale", cfg.density_scale)))
    else:
        extra = {"blocks": cfg.blocks, "sigma": cfg.sigma, "density_scale": cfg.density_scale} \
            if cfg.kind == "density" else {}
        mcfg = counter_config(cfg.kind, backbone=cfg.backbone, diameter=cfg.diameter, **extra)
    if cfg.kind == "regression":
        mcfg["window"] = cfg.crop
    return cfg, mcfg, start_counter


def _training_data(cfg: TrainConfig, train, synthetic, unlabelled, val, data_diameter):
    """``(real, synthetic, unlabelled, validation)`` items at the model's scale, checked against the strategy."""
    factor = 1.0 if data_diameter is None else cfg.diameter / float(data_diameter)
    real = [it for it in _as_items(train, factor=factor) if it.centres is not None]
    syn = _as_items(synthetic, factor=factor)
    unl = list(_as_items(unlabelled, factor=factor, unlabelled=True))
    if cfg.strategy in ("supervised", "finetune", "dual", "cutmix") and not real:
        if cfg.strategy == "supervised" and syn:
            real, syn = syn, []
        else:
            raise ValueError(f"strategy {cfg.strategy!r} needs labelled training images (train=...)")
    if cfg.strategy in ("dual", "finetune", "cutmix") and not syn:
        raise ValueError(f"strategy {cfg.strategy!r} needs synthetic images (synthetic=...)")
    if cfg.strategy == "pseudo-label":
        if not unl:
            raise ValueError("strategy 'pseudo-label' needs unlabelled real images (--unlabelled)")
        if not (real or syn):
            raise ValueError("strategy 'pseudo-label' needs labelled images (--synthetic or TRAIN)")
    rng = np.random.default_rng(cfg.seed)
    val_items = []
    if val is not None:
        val_items = [it for it in _as_items(val, factor=factor) if it.centres is not None]
    elif cfg.val_fraction > 0 and len(real) > 1:
        real, val_items = split_items(real, cfg.val_fraction, rng=rng)
    elif cfg.val_fraction > 0 and len(syn) > 1:
        syn, val_items = split_items(syn, cfg.val_fraction, rng=rng)
    return real, syn, unl, val_items


def _network(cfg: TrainConfig, mcfg: dict, start_counter, dev):
    """``(network, optimiser, teacher or None)`` on ``dev``."""
    import torch

    from ._nets import build_net

    pretrained_file = None
    if start_counter is None and cfg.pretrained:
        pretrained_file, mcfg["pretrained"] = _pretrained_file(cfg.pretrained)
    net = build_net(mcfg, pretrained_file=pretrained_file).float()
    if start_counter is not None:
        net.load_state_dict(start_counter.net.state_dict())
    net = net.to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    teacher = None
    if cfg.strategy == "pseudo-label":
        teacher = copy.deepcopy(net).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    return net, opt, teacher


def _start_state(out, ckpt, resume: bool, overwrite: bool, net, opt, teacher, dev) -> dict:
    """The run's state: new, or read back with the weights from the checkpoint when resuming."""
    import torch

    if out is not None and not resume and not overwrite and out.exists() and any(out.iterdir()):
        hint = "pass --resume to continue it or " if (ckpt / "state.json").is_file() else ""
        raise FileExistsError(f"{out} already holds a model or training run; {hint}pass --overwrite to replace it")
    if not resume:
        return {"epoch": 0, "history": [], "best": None}
    if ckpt is None or not (ckpt / "state.json").is_file():
        raise FileNotFoundError(f"nothing to resume: no checkpoint in {ckpt}")
    from safetensors.torch import load_file

    net.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    opt.load_state_dict(torch.load(str(ckpt / "optimizer.pt"), map_location=dev, weights_only=True))
    if teacher is not None and (ckpt / "teacher.safetensors").is_file():
        teacher.load_state_dict(load_file(str(ckpt / "teacher.safetensors")))
    return io.read_json(ckpt / "state.json")


def _epoch(net, opt, teacher, batcher, cfg: TrainConfig, mcfg: dict, epoch: int, steps: int, dev, state: dict,
           progress) -> dict:
    """One epoch of training; its record (loss, learning rate, seconds). Refuses a diverged network."""
    import torch

    for g in opt.param_groups:
        g["lr"] = _lr_at(cfg, epoch)
    net.train()
    losses = []
    t0 = time.time()
    for step in range(1, steps + 1):
        x, y = batcher.labelled(epoch)
        xt = torch.from_numpy(x).to(dev)
        loss = _loss(net, xt, torch.from_numpy(y).to(dev), cfg)
        if teacher is not None:
            mx, my, mw = _pseudo_label_batch(batcher, teacher, mcfg, dev, torch.float32)
            loss = loss + _loss(net, torch.from_numpy(mx).to(dev), torch.from_numpy(my).to(dev), cfg,
                                weight=torch.from_numpy(mw).to(dev))
        if not bool(torch.isfinite(loss)):
            raise ValueError(
                f"training diverged: the loss became {float(loss.detach())} at epoch {epoch}, step {step} (learning "
                f"rate {_lr_at(cfg, epoch):g}); try a smaller --lr (the best model of earlier epochs, if any, stays in --out)"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if teacher is not None:
            ema_update(teacher, net, cfg.ema)
        losses.append(float(loss.detach()))
        last = state["history"][-1] if state["history"] else {}
        msg = f"epoch {epoch}/{cfg.epochs} loss {np.mean(losses):.4f}"
        if last.get("val_mae") is not None:
            msg += f" val MAE {last['val_mae']:.2f}"
        report(progress, "train", (epoch - 1) * steps + step, cfg.epochs * steps, msg)
    net.eval()
    if not _sane_output(net, xt, cfg):  # a finite loss can hide weights grown to 1e20 and more
        raise ValueError(
            f"training diverged: after epoch {epoch} the model's output is not finite or counts more cells than "
            f"pixels (learning rate {_lr_at(cfg, epoch):g}); try a smaller --lr (the best model of earlier epochs, "
            "if any, stays in --out)"
        )
    return {"epoch": epoch, "loss": float(np.mean(losses)), "lr": _lr_at(cfg, epoch),
            "seconds": round(time.time() - t0, 2)}


def _save_checkpoint(ckpt: Path, net, opt, teacher, mcfg: dict, state: dict) -> None:
    """Weights, optimiser, teacher and state of the last epoch, each written atomically (``--resume`` reads them)."""
    import torch

    save_counter(net, mcfg, ckpt, overwrite=True)
    with io.atomic_path(ckpt / "optimizer.pt", overwrite=True) as tmp:
        torch.save(opt.state_dict(), str(tmp))
    if teacher is not None:
        from safetensors.torch import save_file

        with io.atomic_path(ckpt / "teacher.safetensors", overwrite=True) as tmp:
            save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(tmp))
    io.write_json(ckpt / "state.json", state, overwrite=True)
