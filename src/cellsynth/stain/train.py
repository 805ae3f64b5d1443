"""Training a staining model on paired folders of TIFFs.

Per-channel 2-98 percentile clip and normalisation (stored in the model config),
random crops with one flip/rotation drawn per sample and applied to all its
planes and channels together, uniform timesteps, the diffusers noise schedule,
an L2 loss on the network's prediction target, Adam, EMA weights (torch's
``AveragedModel`` with an EMA average), mixed precision on CUDA, safetensors checkpoints every epoch and
resume.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .. import io
from ..progress import ProgressCallback, report
from .params import _f, _validate

__all__ = ["TrainConfig", "TrainResult", "train_stain", "dataset_statistics"]


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (the model architecture is in ``model``, a dict of
    :class:`~cellsynth.stain.model.StainModelConfig` fields).

    Examples
    --------
    >>> TrainConfig(epochs=2).batch_size
    8
    """

    epochs: int = _f(100, "passes over the training crops", low=1, high=100000)
    steps_per_epoch: int = _f(0, "optimiser steps per epoch (0: one crop per field of view per sample)", low=0)
    batch_size: int = _f(8, "crops per step", low=1, high=1024)
    crop: int = _f(64, "training crop size (also the model's tile size)", low=8, high=4096)
    lr: float = _f(8e-5, "Adam learning rate", low=0.0, high=1.0)
    ema_decay: float = _f(0.999, "EMA decay of the saved weights (0: no EMA)", low=0.0, high=1.0)
    seed: int = _f(0, "seed of initialisation, crops, augmentation and noise", low=0)
    minutes: float = _f(0.0, "stop after this much wall-clock time (0: no limit)", low=0.0)
    device: str = _f("auto", "device: 'auto', 'cpu', 'cuda', 'mps'")
    save_dtype: str = _f("float32", "precision of the saved weights ('float32' or 'float16')",
                         choices=("float32", "float16"))
    model: dict = field(default_factory=dict, metadata={"help": "StainModelConfig fields (architecture, schedule)"})

    def __post_init__(self) -> None:
        _validate(self, skip=("device", "model"))
        if not isinstance(self.device, str):
            raise TypeError(f"device must be a string such as 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if not isinstance(self.model, dict):
            raise TypeError(f"model must be a dict of StainModelConfig fields, got {type(self.model).__name__}")
        from .model import StainModelConfig

        # the architecture is checked now, before any data is read (the plane names come from the data)
        StainModelConfig(**{**self.model, "brightfield_names": ["bf"], "channel_names": ["fl"]})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """What :func:`train_stain` did: the model folder, per-epoch mean losses, steps, time."""

    out: Path
    losses: list
    steps: int
    seconds: float
    stopped: str = "done"


def dataset_statistics(dataset, *, max_pixels: int = 2_000_000, seed: int = 0) -> dict:
    """Per-plane/channel percentiles, mean and std in [0, 1], and Otsu mask levels.

    Returns
    -------
    dict
        ``condition_norm``, ``target_norm`` (``low``/``high``/``mean``/``std`` lists)
        and ``mask_levels`` (per channel, model-space [background, foreground]).
    """
    from skimage.filters import threshold_otsu

    from .model import to_unit

    rng = np.random.default_rng(seed)
    per = max(1, max_pixels // max(len(dataset), 1))
    samples_bf, samples_fl = [], []
    for i in range(len(dataset)):
        bf, fl = dataset.load(i)
        size = bf.shape[1] * bf.shape[2]
        idx = slice(None) if size <= per else rng.choice(size, size=per, replace=False)
        samples_bf.append(bf.reshape(len(bf), -1)[:, idx])
        samples_fl.append(fl.reshape(len(fl), -1)[:, idx])
    out = {}
    for key, s in (("condition_norm", np.concatenate(samples_bf, 1)), ("target_norm", np.concatenate(samples_fl, 1))):
        low, high = np.percentile(s, 2, axis=1), np.percentile(s, 98, axis=1)
        high = np.where(high > low, high, low + 1)
        norm = {"low": low.tolist(), "high": high.tolist(), "mean": [0.0] * len(s), "std": [1.0] * len(s)}
        unit = to_unit(s[:, :, None], norm)[:, :, 0]
        norm["mean"] = unit.mean(axis=1).tolist()
        norm["std"] = np.maximum(unit.std(axis=1), 1e-6).tolist()
        out[key] = norm
        out[key + "_unit"] = unit
    levels = []
    tn = out["target_norm"]
    for ch, u in enumerate(out.pop("target_norm_unit")):
        try:
            th = threshold_otsu(u)
        except ValueError:
            th = 0.5
        lo = float(u[u <= th].mean()) if np.any(u <= th) else 0.0
        hi = float(u[u > th].mean()) if np.any(u > th) else 1.0
        levels.append([(lo - tn["mean"][ch]) / tn["std"][ch], (hi - tn["mean"][ch]) / tn["std"][ch]])
    out.pop("condition_norm_unit")
    out["mask_levels"] = levels
    return out


def _augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random flip / 90-degree rotation, the same for every plane of ``x`` (P, M, N)."""
    k = int(rng.integers(0, 4))
    x = np.rot90(x, k, axes=(1, 2))
    if rng.random() < 0.5:
        x = x[:, :, ::-1]
    return np.ascontiguousarray(x)


def _crop(stack: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    _, m, n = stack.shape
    if m < size or n < size:
        stack = np.pad(stack, ((0, 0), (0, max(0, size - m)), (0, max(0, size - n))), mode="reflect")
        _, m, n = stack.shape
    r, c = int(rng.integers(0, m - size + 1)), int(rng.integers(0, n - size + 1))
    return stack[:, r:r + size, c:c + size]


def _save_state(ckpt: Path, unet, ema, opt, state: dict) -> None:
    """Training state as safetensors (weights, EMA weights, Adam moments) + JSON (counters)."""
    from safetensors.torch import save_file

    ckpt.mkdir(parents=True, exist_ok=True)
    tensors = {f"unet.{k}": v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
    if ema is not None:
        for k, v in ema.module.state_dict().items():
            tensors[f"ema.{k}"] = v.detach().cpu().contiguous()
    params = [p for g in opt.param_groups for p in g["params"]]
    opt_steps = {}
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                tensors[f"adam.{i}.{key}"] = st[key].detach().cpu().contiguous()
        if "step" in st:
            opt_steps[str(i)] = float(st["step"])
    with io.atomic_path(ckpt / "state.safetensors", overwrite=True) as tmp:
        save_file(tensors, str(tmp))
    io.write_json(ckpt / "state.json", {**state, "adam_steps": opt_steps,
                                        "ema_step": int(ema.n_averaged) if ema is not None else 0},
                  overwrite=True)


def _load_state(ckpt: Path, unet, ema, opt) -> dict:
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(ckpt / "state.safetensors"))
    state = io.read_json(ckpt / "state.json")
    unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
    if ema is not None:
        ema.module.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        ema.n_averaged.fill_(int(state.get("ema_step", 0)))
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        if f"adam.{i}.exp_avg" in tensors:
            opt.state[p] = {"step": torch.tensor(state["adam_steps"].get(str(i), 0.0)),
                            "exp_avg": tensors[f"adam.{i}.exp_avg"].to(p.device),
                            "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"].to(p.device)}
    return state


def _diverged(value: float, epoch: int, step: int, out: Path) -> str:
    return (f"training stopped at epoch {epoch + 1}, step {step + 1}: the loss is {value} (not finite), so this "
            f"epoch is not saved; {out} keeps the last finished epoch, if any. Lower the learning rate (--lr) "
            "or check the data for extreme values")


def train_stain(
    data_dir: os.PathLike | str,
    out: os.PathLike | str,
    *,
    config: Optional[TrainConfig] = None,
    resume: bool = False,
    progress: Optional[ProgressCallback] = None,
    validate=None,
) -> TrainResult:
    """Train a staining model on a paired-data folder and write it to ``out``.

    After every epoch ``out`` holds a usable model (EMA weights, ``config.json``
    with the normalisation, ``model.safetensors``) and ``out/checkpoint`` the
    training state; ``resume=True`` continues from it.

    Parameters
    ----------
    data_dir : path-like
        Paired data (:mod:`cellsynth.stain.data`).
    out : path-like
        Model folder.
    config : TrainConfig, optional
    resume : bool
        Continue from ``out/checkpoint``.
    progress : ProgressCallback, optional
        One event per optimiser step (stage ``"train"``); may raise Cancelled
        (the last finished epoch stays saved).
    validate : callable, optional
        ``validate(pipeline, epoch) -> dict`` called after each epoch with the EMA
        model; its result is stored in ``config.json`` under ``training.validation``.

    Returns
    -------
    TrainResult

    Raises
    ------
    FileExistsError
        If ``out`` already holds a model and ``resume`` is False.
    ValueError
        If the data hold NaN or infinite values, or the loss stops being finite
        (nothing of that epoch is saved).
    """
    import torch
    from diffusers import DDPMScheduler
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from ..device import resolve_device
    from .data import read_stain_dataset
    from .model import StainModelConfig, build_unet, normalise, save_stain_model
    from .pipeline_stain import StainPipeline

    config = config or TrainConfig()
    ds = read_stain_dataset(data_dir)
    out = Path(out)
    ckpt = out / "checkpoint"
    if not resume and (out / "model.safetensors").exists():
        raise FileExistsError(f"{out} already holds a model; pass resume=True to continue training it")
    if resume and not (ckpt / "state.json").is_file():
        raise FileNotFoundError(f"nothing to resume: {ckpt / 'state.json'} does not exist")
    io.remove_stale_parts(out, names=("model.safetensors", "config.json"))  # left by a killed run
    io.remove_stale_parts(ckpt, names=("state.safetensors", "state.json"))
    device = resolve_device(config.device)
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)

    if resume:
        mcfg = StainModelConfig.from_dict(io.read_json(out / "config.json")["config"])
    else:
        stats = dataset_statistics(ds, seed=config.seed)
        mcfg = StainModelConfig(**{**config.model, "brightfield_names": list(ds.brightfield),
                                   "channel_names": list(ds.channels), "sample_size": config.crop, **stats})
    data = []
    for i in range(len(ds)):
        bf, fl = ds.load(i)
        data.append(np.concatenate([normalise(bf, mcfg.condition_norm), normalise(fl, mcfg.target_norm)]))
    nc = mcfg.n_condition

    unet = build_unet(mcfg).to(device).train()
    opt = torch.optim.Adam(unet.parameters(), lr=config.lr)
    ema = (AveragedModel(unet, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay))
           if config.ema_decay > 0 else None)
    sched = DDPMScheduler(**mcfg.scheduler_config())
    epoch0, step, losses, elapsed0 = 0, 0, [], 0.0
    if resume:
        state = _load_state(ckpt, unet, ema, opt)
        epoch0, step, losses, elapsed0 = state["epoch"], state["step"], state["losses"], state.get("seconds", 0.0)
        rng = np.random.default_rng([config.seed, epoch0])
        torch.manual_seed(config.seed + epoch0)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    steps_per_epoch = config.steps_per_epoch or max(1, int(np.ceil(len(data) / config.batch_size)))
    total = config.epochs * steps_per_epoch
    t_start = time.time() - elapsed0
    stopped = "done"

    def save(epoch: int) -> None:
        model = ema.module if ema is not None else unet
        pipe_extra = {"epochs": epoch, "steps": step, "seconds": round(time.time() - t_start, 1),
                      "losses": [round(v, 6) for v in losses], "data": str(Path(data_dir)), "n_fovs": len(ds),
                      "config": config.to_dict()}
        if validate is not None:
            model.eval()
            pipe_extra["validation"] = validate(StainPipeline(model, mcfg), epoch)
            model.train()
        save_stain_model(model, mcfg, out, dtype=config.save_dtype, extra=pipe_extra)
        _save_state(ckpt, unet, ema, opt, {"epoch": epoch, "step": step, "losses": losses,
                                           "seconds": time.time() - t_start})

    for epoch in range(epoch0, config.epochs):
        running = []
        for _ in range(steps_per_epoch):
            batch = np.stack([_augment(_crop(data[int(rng.integers(len(data)))], config.crop, rng), rng)
                              for _ in range(config.batch_size)])
            xb = torch.from_numpy(batch).to(device)
            cond, target = xb[:, :nc], xb[:, nc:]
            noise = torch.randn_like(target)
            t = torch.randint(0, mcfg.num_train_timesteps, (len(xb),), device=device)
            noisy = sched.add_noise(target, noise, t)
            if mcfg.prediction_type == "epsilon":
                goal = noise
            elif mcfg.prediction_type == "sample":
                goal = target
            else:
                goal = sched.get_velocity(target, noise, t)
            with torch.autocast(device.type, enabled=use_amp):
                pred = unet(torch.cat([cond, noisy], 1), t).sample
            loss = torch.nn.functional.mse_loss(pred.float(), goal)
            value = loss.item()
            if not np.isfinite(value):
                raise ValueError(_diverged(value, epoch, step, out))
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            if ema is not None:
                ema.update_parameters(unet)
            step += 1
            running.append(value)
            report(progress, "train", step, total, f"epoch {epoch + 1}/{config.epochs}: loss {np.mean(running):.4f}")
        losses.append(float(np.mean(running)))
        save(epoch + 1)
        if config.minutes and time.time() - t_start > config.minutes * 60:
            stopped = "time"
            break
    from .._provenance import record, write_into

    write_into(out, record("train-stain", inputs=[data_dir], parameters=config.to_dict(),
                           result={"steps": step, "stopped": stopped, "final_loss": losses[-1] if losses else None}))
    return TrainResult(out=out, losses=losses, steps=step, seconds=time.time() - t_start, stopped=stopped)
