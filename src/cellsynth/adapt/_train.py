"""Shared training pieces of adaptation and retraining: items, crops, masked loss, the time-boxed loop.

torch is imported inside the functions.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from ..count.counter import CounterConfig
from ..count.infer import density_peaks
from ..count.targets import density_target
from ..progress import ProgressCallback, report

__all__ = ["Item", "make_item", "crop_item", "masked_density_loss", "finetune", "forward_density",
           "peak_count", "train_mode", "working_scale"]


@dataclass
class Item:
    """One training image at the working scale.

    ``target`` is the density map (mass ``density_scale`` per cell) or None
    (unlabelled); ``mask`` is 1 where the loss counts, None for everywhere.
    """

    image: np.ndarray
    target: Optional[np.ndarray]
    mask: Optional[np.ndarray] = None
    centres: Optional[np.ndarray] = None


def make_item(image: np.ndarray, centres, config: dict, mask: Optional[np.ndarray] = None) -> Item:
    """An :class:`Item` with the density target of ``centres`` (None: unlabelled)."""
    tgt = None
    if centres is not None:
        tgt = density_target(centres, image.shape, sigma=CounterConfig.of(config).sigma,
                             scale=CounterConfig.of(config).density_scale)
    return Item(np.asarray(image, np.float32), tgt, mask, None if centres is None else np.asarray(centres, float))


def working_scale(diameter: float, base_diameter: float, span: float = 1.6) -> float:
    """Cell diameter to train at: the user's own when within ``span`` of the base's scale, else the nearest bound.

    Training at the user's own pixel size means that the adapted counter counts
    the user's images without rescaling (``cellsynth count IMAGE --model DIR``).

    Examples
    --------
    >>> working_scale(13.0, 15.0), working_scale(60.0, 15.0)
    (13.0, 24.0)
    """
    return float(np.clip(diameter, base_diameter / span, base_diameter * span))


def crop_item(item: Item, size: int, rng: np.random.Generator, *, box=None):
    """A random ``size x size`` crop (zero-padded when smaller) of image, target and mask, with a random rot90/flip.

    ``box`` (row0, col0, row1, col1): the crop is placed to overlap it.
    Returns ``(image, target or None, mask or None)``.
    """
    img, tgt, msk = item.image, item.target, item.mask
    rows, cols = img.shape
    if rows < size or cols < size:
        pad = ((0, max(0, size - rows)), (0, max(0, size - cols)))
        img = np.pad(img, pad, mode="constant")
        tgt = None if tgt is None else np.pad(tgt, pad, mode="constant")
        # padding is not a checked region: its (empty) target should not teach "no cells here" on real borders
        msk = np.pad(np.ones((rows, cols), np.float32) if msk is None else msk, pad, mode="constant")
        rows, cols = img.shape
    if box is not None:
        r_lo, r_hi = max(0, box[0] - size + 1), min(rows - size, box[2] - 1)
        c_lo, c_hi = max(0, box[1] - size + 1), min(cols - size, box[3] - 1)
        r0 = int(rng.integers(min(r_lo, r_hi), max(r_lo, r_hi) + 1))
        c0 = int(rng.integers(min(c_lo, c_hi), max(c_lo, c_hi) + 1))
    else:
        r0 = int(rng.integers(0, rows - size + 1))
        c0 = int(rng.integers(0, cols - size + 1))
    sl = (slice(r0, r0 + size), slice(c0, c0 + size))
    k, flip = int(rng.integers(0, 4)), bool(rng.random() < 0.5)

    def aug(a):
        if a is None:
            return None
        a = np.rot90(a[sl], k)
        return np.ascontiguousarray(a[:, ::-1] if flip else a)

    return aug(img), aug(tgt), aug(msk)


def masked_density_loss(pred, target, mask=None, *, scale: float, count_weight: float = 0.01):
    """Pixel MSE plus a relative count term, both only where ``mask`` is 1.

    ``pred``, ``target``, ``mask``: tensors (B, 1, H, W), densities already
    multiplied by ``scale``. Without a mask this equals
    :func:`cellsynth.count._nets.density_loss`. Pixels with mask 0 contribute
    nothing, not even a gradient.
    """
    import torch

    if mask is None:
        mask = torch.ones_like(target)
    area = mask.sum(dim=(1, 2, 3))
    total = area.sum().clamp_min(1.0)
    mse = (((pred - target) ** 2) * mask).sum() / total
    n_pred = (pred * mask).sum(dim=(1, 2, 3)) / scale
    n_true = (target * mask).sum(dim=(1, 2, 3)) / scale
    has = (area > 0).float()
    count = ((n_pred - n_true).abs() / torch.sqrt(n_true + 1.0) * has).sum() / has.sum().clamp_min(1.0)
    # mean over all pixels, as density_loss does: rescale the masked mean by the checked share
    share = total / float(np.prod(target.shape))
    return mse * share + count_weight * count


def forward_density(net, plane: np.ndarray, *, scale: float, device, stride: int = 16) -> np.ndarray:
    """Density map (cells per pixel) of one normalised plane by one forward pass (mirror-padded to the stride)."""
    import torch

    rows, cols = plane.shape
    pr, pc = (-rows) % stride + stride, (-cols) % stride + stride
    m = stride // 2
    x = np.pad(plane, ((m, pr - m), (m, pc - m)), mode="symmetric")
    with torch.inference_mode():
        t = torch.from_numpy(np.ascontiguousarray(x)[None, None]).to(device=device, dtype=torch.float32)
        y = net(t).float().cpu().numpy()[0, 0]
    return y[m:m + rows, m:m + cols] / scale


def peak_count(density: np.ndarray, config: dict) -> tuple[np.ndarray, np.ndarray]:
    """Peaks of a working-scale density map with the counter's settings (as counting does)."""
    return density_peaks(density, min_distance=0.3 * CounterConfig.of(config).diameter,
                         sigma=CounterConfig.of(config).sigma,
                         threshold=CounterConfig.of(config).peak_threshold)


def finetune(
    net,
    sample: Callable[[np.random.Generator, object], tuple],
    *,
    seconds: float,
    max_steps: int,
    min_steps: int = 1,
    lr: float,
    scale: float,
    device,
    seed: int = 0,
    ema: Optional[float] = None,
    progress: Optional[ProgressCallback] = None,
    stage: str = "train",
    freeze_bn: bool = False,
    checks: int = 0,
    on_check: Optional[Callable[[object, int], None]] = None,
) -> tuple[object, dict]:
    """Train ``net`` in place for ``seconds`` of wall time (between ``min_steps`` and ``max_steps`` steps).

    ``sample(rng, teacher)`` returns ``(x, y, mask)`` float32 arrays (B, 1, H, W)
    (``mask`` may be None). With ``ema``, a teacher (an exponential moving
    average of ``net``, starting as a copy) is kept and passed to ``sample``.
    Adam with a cosine decay of the learning rate over the time budget.
    Progress: one event per step; the total is re-estimated from the step time.

    ``freeze_bn``: BatchNorm layers keep the base's running statistics (they stay
    in eval mode; their weights still learn), so a few crops of one image cannot
    shift the statistics every other image is counted with.
    ``on_check(net, step)`` is called with the network in eval mode after each
    ``1/checks`` of the time budget (the last call after the final step); the
    time it takes counts against the budget.

    Returns
    -------
    net, info
        ``info``: steps, seconds, mean loss of the first and last tenth of steps.
    """
    import torch

    from ..count.train import ema_update

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    train_mode(net, freeze_bn)
    teacher = _frozen_copy(net) if ema is not None else None
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    t0 = time.perf_counter()
    losses: list[float] = []
    step = 0
    est_total = max_steps
    per = 0.0
    next_check = 1

    def check() -> None:
        net.eval()
        with torch.no_grad():
            on_check(net, step)
        train_mode(net, freeze_bn)

    while step < max_steps:
        elapsed = time.perf_counter() - t0
        if step >= min_steps and elapsed + per >= seconds:  # stop before a step that would overrun
            break
        if (on_check is not None and seconds > 0 and next_check < checks and step > 0
                and elapsed >= seconds * next_check / checks):
            check()
            next_check += 1
        frac = min(1.0, max(elapsed / max(seconds, 1e-9), step / max_steps))
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * frac))
        x, y, m = sample(rng, teacher)
        xt = torch.from_numpy(x).to(device)
        yt = torch.from_numpy(y).to(device)
        mt = None if m is None else torch.from_numpy(m).to(device)
        loss = masked_density_loss(net(xt), yt, mt, scale=scale)
        if progress is not None:  # between the forward and the backward pass: Cancel waits half a step
            report(progress, stage, step, max(step + 1, min_steps),
                   f"loss {np.mean(losses[-10:]):.4f}" if losses else "")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if teacher is not None:
            ema_update(teacher, net, ema)
        losses.append(float(loss.detach()))
        step += 1
        per = (time.perf_counter() - t0) / step
        est_total = int(np.clip(max(step, min_steps, round(seconds / max(per, 1e-9))), step, max_steps))
        report(progress, stage, step, est_total, f"loss {np.mean(losses[-10:]):.4f}")
    if on_check is not None and checks > 0:
        check()
    net.eval()
    return net, _train_info(losses, step, time.perf_counter() - t0)


def _frozen_copy(net):
    teacher = copy.deepcopy(net).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _train_info(losses: list[float], steps: int, seconds: float) -> dict:
    """Steps, seconds, the mean loss of the first and last tenth of steps, and the loss curve (at most 200 points)."""
    k = max(1, len(losses) // 10)
    every = max(1, len(losses) // 200)
    return {"steps": steps, "seconds": round(seconds, 2),
            "loss_first": float(np.mean(losses[:k])) if losses else None,
            "loss_last": float(np.mean(losses[-k:])) if losses else None,
            "loss_curve": [[i + 1, round(float(np.mean(losses[i:i + every])), 6)]
                           for i in range(0, len(losses), every)]}


def train_mode(net, freeze_bn: bool = False):
    """``net.train()``; with ``freeze_bn`` its BatchNorm layers stay in eval mode (running statistics kept)."""
    from torch import nn

    net.train()
    if freeze_bn:
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    return net


def stack_batch(parts: Sequence[tuple]) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Stack ``(image, target, mask)`` crops into (B, 1, H, W) arrays; masks of None become ones."""
    x = np.stack([p[0] for p in parts])[:, None].astype(np.float32)
    y = np.stack([p[1] for p in parts])[:, None].astype(np.float32)
    if all(p[2] is None for p in parts):
        return x, y, None
    m = np.stack([np.ones_like(p[0]) if p[2] is None else p[2] for p in parts])[:, None].astype(np.float32)
    return x, y, m
