"""The counter networks (torch modules). Imported only by functions that need torch.

Two heads on a timm EfficientNet backbone, randomly initialised or from a local
weights file (ImageNet weights resolved by :mod:`cellsynth.weights`):

* :class:`DensityNet` keeps only the first ``blocks`` blocks of the backbone
  (for ``efficientnet_b0`` and ``blocks=4``: stem and stages 1-4, strides 2 to 16,
  about 0.3 M parameters instead of 4 M) and adds a light top-down decoder that
  predicts a non-negative cell-density map at the input resolution. The count of a
  region is the sum of the map over it (divided by ``density_scale``). Cells of
  nuclear size need little context, and the early stages cost most of the
  compute anyway, so the deep low-resolution stages add weight and time but
  little accuracy for counting.
* :class:`RegressionNet` is the InST-Microscopy paper's counter: the whole
  backbone, global pooling and a ``Linear(num_features, 1)`` count head.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DensityNet", "RegressionNet", "build_net", "density_loss", "fold_batchnorm"]


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class DensityNet(nn.Module):
    """Truncated EfficientNet encoder + top-down decoder -> density map.

    Parameters
    ----------
    backbone : str
        timm model name of the EfficientNet family (``"efficientnet_b0"``, ``"test_efficientnet"``).
    blocks : int
        Number of backbone blocks (stages) kept after the stem.
    in_chans : int
        Input channels.

    The input height and width must be multiples of :attr:`stride`.
    """

    def __init__(self, backbone: str = "efficientnet_b0", *, blocks: int = 4, in_chans: int = 1,
                 pretrained_file: Optional[str] = None) -> None:
        super().__init__()
        full = _timm_model(backbone, in_chans=in_chans, num_classes=0, pretrained_file=pretrained_file)
        if not hasattr(full, "blocks") or not hasattr(full, "conv_stem"):
            raise ValueError(f"backbone {backbone!r} is not an EfficientNet-style timm model")
        if not 1 <= blocks <= len(full.blocks):
            raise ValueError(f"blocks must be in [1, {len(full.blocks)}] for {backbone}, got {blocks}")
        self.stem = nn.Sequential(full.conv_stem, full.bn1)
        self.blocks = nn.ModuleList(full.blocks[:blocks])
        # Find the output stride and width of each kept block with a dummy pass.
        with torch.no_grad():
            x = self.stem(torch.zeros(1, in_chans, 64, 64))
            strides, widths = [], []
            for b in self.blocks:
                x = b(x)
                strides.append(64 // x.shape[-1])
                widths.append(x.shape[1])
        # Skip taps: the last block of each stride.
        self.taps = [i for i in range(len(strides)) if i == len(strides) - 1 or strides[i + 1] != strides[i]]
        tap_strides = [strides[i] for i in self.taps]
        tap_widths = [widths[i] for i in self.taps]
        self.stride = tap_strides[-1]
        dec = [max(16, min(64, w)) for w in tap_widths]
        self.top = _conv_bn_relu(tap_widths[-1], dec[-1])
        self.merge = nn.ModuleList(
            _conv_bn_relu(dec[i + 1] + tap_widths[i], dec[i]) for i in range(len(self.taps) - 1)
        )
        self.head = nn.Conv2d(dec[0], 1, 1)
        nn.init.constant_(self.head.bias, 0.05)
        self.out_stride = tap_strides[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Density of shape (B, 1, H, W) for input (B, C, H, W); H, W multiples of ``stride``."""
        size = x.shape[-2:]
        x = self.stem(x)
        feats = []
        for i, b in enumerate(self.blocks):
            x = b(x)
            if i in self.taps:
                feats.append(x)
        y = self.top(feats[-1])
        for i in range(len(feats) - 2, -1, -1):
            y = F.interpolate(y, size=feats[i].shape[-2:], mode="bilinear", align_corners=False)
            y = self.merge[i](torch.cat([y, feats[i]], dim=1))
        y = F.relu(self.head(y))
        if y.shape[-2:] != size:
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return y


TORCHVISION_PREFIX = "torchvision:"


class RegressionNet(nn.Module):
    """The paper's scalar counter: EfficientNet backbone + ``Linear(num_features, 1)``.

    ``backbone`` is a timm model name, or ``"torchvision:efficientnet_b0"`` for the
    torchvision model the paper's public code trains (``features.*`` and
    ``classifier.1.*`` parameters), so its checkpoints load unchanged. A
    one-channel input is repeated over ``in_chans`` channels.
    """

    def __init__(self, backbone: str = "efficientnet_b0", *, in_chans: int = 1,
                 pretrained_file: Optional[str] = None) -> None:
        super().__init__()
        self.in_chans = int(in_chans)
        if backbone.startswith(TORCHVISION_PREFIX):
            if pretrained_file is not None:
                raise ValueError("pretrained weights are loaded for timm backbones only")
            import torchvision

            name = backbone[len(TORCHVISION_PREFIX):]
            if name != "efficientnet_b0":
                raise ValueError(f"torchvision backbone must be 'efficientnet_b0', got {name!r}")
            net = torchvision.models.efficientnet_b0(weights=None)
            if self.in_chans != 3:
                old = net.features[0][0]
                net.features[0][0] = nn.Conv2d(self.in_chans, old.out_channels, old.kernel_size, old.stride,
                                               old.padding, bias=False)
            net.classifier[1] = nn.Linear(net.classifier[1].in_features, 1)
            self.net = net
        else:
            self.net = _timm_model(backbone, in_chans=in_chans, num_classes=1, pretrained_file=pretrained_file)
        self.stride = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Counts of shape (B,) for input (B, C, H, W)."""
        if x.shape[1] == 1 and self.in_chans > 1:
            x = x.expand(-1, self.in_chans, -1, -1)
        return self.net(x)[:, 0]


def _timm_model(backbone: str, *, in_chans: int, num_classes: int, pretrained_file: Optional[str]):
    """A timm model, random or initialised from a local weights file (first conv adapted to ``in_chans``)."""
    import timm

    if pretrained_file is None:
        return timm.create_model(backbone, pretrained=False, in_chans=in_chans, num_classes=num_classes)
    try:
        return timm.create_model(backbone, pretrained=True, pretrained_cfg_overlay={"file": str(pretrained_file)},
                                 in_chans=in_chans, num_classes=num_classes)
    except (RuntimeError, KeyError) as exc:
        raise ValueError(f"{pretrained_file} does not hold {backbone} weights: {exc}") from exc


def build_net(config: dict, *, pretrained_file: Optional[str] = None) -> nn.Module:
    """Build a network from a counter config (``kind``, ``backbone``, ...).

    Random initialisation, or the backbone's weights from ``pretrained_file`` (a
    timm checkpoint such as ImageNet weights; the heads stay random).
    """
    kind = config.get("kind")
    if kind == "density":
        return DensityNet(config["backbone"], blocks=int(config["blocks"]), in_chans=int(config["in_chans"]),
                          pretrained_file=pretrained_file)
    if kind == "regression":
        return RegressionNet(config["backbone"], in_chans=int(config["in_chans"]), pretrained_file=pretrained_file)
    raise ValueError(f"unknown counter kind {kind!r}; expected 'density' or 'regression'")


def density_loss(pred: torch.Tensor, target: torch.Tensor, *, scale: float, count_weight: float = 0.01) -> torch.Tensor:
    """Pixel MSE on the scaled density plus a relative L1 term on the counts.

    ``pred`` and ``target`` are (B, 1, H, W) densities already multiplied by ``scale``.
    """
    mse = F.mse_loss(pred, target)
    n_pred = pred.sum(dim=(1, 2, 3)) / scale
    n_true = target.sum(dim=(1, 2, 3)) / scale
    count = ((n_pred - n_true).abs() / torch.sqrt(n_true + 1.0)).mean()
    return mse + count_weight * count


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """An inference copy of ``net`` with every BatchNorm folded into the convolution before it.

    Each ``Conv2d`` directly followed (among its parent's children) by a
    ``BatchNorm2d`` with running statistics is replaced by the fused convolution
    (:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`); the BatchNorm by what it
    applied after normalising (timm's ``BatchNormAct2d`` keeps its activation).
    ``net`` itself is left untouched (it may still be trained); the copy is in
    eval mode and gives the same outputs up to rounding.
    """
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    out = copy.deepcopy(net).eval()

    def fold(module: nn.Module) -> None:
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                module._modules[a] = fuse_conv_bn_eval(conv, bn)
                rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None))
                        if m is not None and not isinstance(m, nn.Identity)]
                module._modules[b] = nn.Sequential(*rest) if rest else nn.Identity()
        for child in module.children():
            fold(child)

    fold(out)
    return out
