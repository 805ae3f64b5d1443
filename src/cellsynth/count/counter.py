"""The counter object and the description of a counter: its config, its network built from a state dict.

:class:`Counter` is what :func:`~cellsynth.count.load_counter` returns and what
counting runs; :func:`counter_config` describes a counter (what to build and
how to run it). The modules that load counters (folders, files, bioimage.io
packages) build them with :func:`_build_loaded` from here, below all of them.
torch is imported inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .. import io

__all__ = ["Counter", "CounterConfig", "DEFAULTS", "counter_config", "net_stamp", "COUNTER_FORMAT", "KINDS",
           "WEIGHTS_FILE", "CONFIG_FILE"]

COUNTER_FORMAT = "cellsynth-counter"
KINDS = ("density", "regression", "classic")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


#: The one set of defaults of a counter's settings: what :func:`counter_config` writes into a new config and
#: what :class:`CounterConfig` reads where a config (an older or imported one) leaves a setting out.
DEFAULTS: dict[str, Any] = {
    "in_chans": 1, "diameter": 15.0, "normalize": {"low": 1.0, "high": 99.8}, "blocks": 4, "sigma": 2.5,
    "density_scale": 100.0, "peak_threshold": 0.3, "window": 256, "rescale": True, "diameter_scale": 1.0,
}


@dataclass(frozen=True)
class CounterConfig:
    """A counter's settings, read once from its config dict with :data:`DEFAULTS` for what it leaves out.

    Counting, adaptation, retraining and export read the settings through this
    class (``CounterConfig.of(config)`` or ``counter.settings``), so a setting a
    config lacks has the same value on every path.

    Examples
    --------
    >>> s = CounterConfig.of({"kind": "density", "diameter": 12})
    >>> s.diameter, s.density_scale, s.sigma, s.rescale
    (12.0, 100.0, 2.5, True)
    >>> CounterConfig.of({"kind": "density", "sigma": -1})
    Traceback (most recent call last):
    ...
    ValueError: counter config: 'sigma' must be a positive number, got -1
    """

    kind: str
    diameter: float
    in_chans: int
    blocks: int
    sigma: float
    density_scale: float
    peak_threshold: float
    window: int
    rescale: bool
    diameter_scale: float = 1.0
    normalize: dict = field(default_factory=dict)
    objects: Optional[dict] = None

    @classmethod
    def of(cls, config: dict) -> "CounterConfig":
        if not isinstance(config, dict) or config.get("kind") not in KINDS:
            raise ValueError(f"counter config: kind must be one of {KINDS}, got "
                             f"{config.get('kind') if isinstance(config, dict) else config!r}")
        _check_config_numbers(config, "counter config")
        get = lambda key: config.get(key, DEFAULTS.get(key))  # noqa: E731
        threshold = get("peak_threshold")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
            raise ValueError(f"counter config: 'peak_threshold' must be in [0, 1), got {threshold!r}")
        return cls(kind=config["kind"], diameter=float(get("diameter")), in_chans=int(get("in_chans")),
                   blocks=int(get("blocks")), sigma=float(get("sigma")), density_scale=float(get("density_scale")),
                   peak_threshold=float(threshold), window=int(get("window")), rescale=bool(get("rescale")),
                   diameter_scale=float(get("diameter_scale")), normalize=dict(config.get("normalize") or {}), objects=config.get("objects") or None)


def counter_config(kind: str = "density", *, backbone: str = "efficientnet_b0", **overrides: Any) -> dict:
    """The config of a new counter, with defaults for ``kind``.

    Keys: ``format``, ``version``, ``kind``, ``backbone``, ``blocks`` (density:
    backbone blocks kept), ``in_chans``, ``diameter`` (cell diameter in pixels at
    the training scale), ``sigma`` and ``density_scale`` (density targets: Gaussian
    width in pixels and mass per cell), ``peak_threshold`` (minimum peak height
    as a fraction of a lone cell's peak), ``window`` (regression: window side),
    ``normalize`` (percentiles). Optional: ``objects`` (density counters: the
    :class:`~cellsynth.count.objects.ObjectParams` that reconcile peaks with
    foreground objects; absent: the points are the density peaks), ``rescale``
    (False: never rescale to a diameter, for imported models of unknown scale),
    ``diameter_scale`` (the nuclei are counted as this multiple of the diameter
    given or estimated: fitted to a person's corrections by retraining).

    Examples
    --------
    >>> c = counter_config("density", backbone="test_efficientnet", blocks=3)
    >>> c["kind"], c["blocks"], c["diameter"]
    ('density', 3, 15.0)
    >>> counter_config("magic")
    Traceback (most recent call last):
    ...
    ValueError: unknown counter kind 'magic'; expected one of ('density', 'regression', 'classic')
    """
    if kind not in KINDS:
        raise ValueError(f"unknown counter kind {kind!r}; expected one of {KINDS}")
    cfg: dict[str, Any] = {
        "format": COUNTER_FORMAT,
        "version": 1,
        "kind": kind,
        "backbone": backbone,
        "in_chans": DEFAULTS["in_chans"],
        "diameter": DEFAULTS["diameter"],
        "normalize": dict(DEFAULTS["normalize"]),
    }
    if kind == "density":
        cfg.update({k: DEFAULTS[k] for k in ("blocks", "sigma", "density_scale", "peak_threshold")})
    elif kind == "regression":
        cfg.update(window=DEFAULTS["window"])
    else:
        cfg.pop("backbone")
        cfg.pop("in_chans")
    unknown = set(overrides) - set(cfg) - {"training", "name", "description", "rescale", "pretrained", "objects",
                                           "diameter_scale"}
    if unknown:
        raise ValueError(f"unknown counter config keys {sorted(unknown)}; expected some of {sorted(cfg)}")
    cfg.update(overrides)
    return cfg

class _Waiting:
    """``Counter.net``, ``.device`` and ``.dtype``: a counter loaded without its network builds it when one is read."""

    def __set_name__(self, owner, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj, owner=None):
        if obj is None:
            return None  # the dataclass default
        build = obj.__dict__.get("_build")
        if build is not None:
            build(obj)
            obj.__dict__["_build"] = None
        return obj.__dict__.get(self.slot)

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.slot] = value


def net_stamp(net) -> tuple:
    """Identity of a network's weights state: every in-place change of a weight bumps its tensor's version."""
    return (id(net),) + tuple((id(t), t._version) for t in list(net.parameters()) + list(net.buffers()))


@dataclass
class Counter:
    """A counter ready to run.

    Attributes
    ----------
    kind : {"density", "regression", "classic"}
        ``density`` gives a density map and points, ``regression`` one count per
        window (no positions), ``classic`` points from a seeded watershed in an Otsu mask.
    name : str
        ``"default"``, ``"classic"`` or the model path.
    config : dict
        See :func:`counter_config`.
    net : torch.nn.Module or None
        The network in eval mode on ``device`` (None for ``classic``). A counter
        loaded without its network (see the module's description) builds it here.
    device : torch.device or None
    dtype : torch.dtype or None
    sha256 : str or None
        Hash of the weights file, for provenance.
    path : Path or None
        Where it was loaded from.
    """

    kind: str
    name: str
    config: dict
    net: Any = _Waiting()
    device: Any = _Waiting()
    dtype: Any = _Waiting()
    sha256: Optional[str] = None
    path: Optional[Path] = None
    extra: dict = field(default_factory=dict)

    @property
    def diameter(self) -> float:
        """Cell diameter in pixels at the scale the model was trained on."""
        return self.settings.diameter

    @property
    def network_built(self) -> bool:
        """False while a counter loaded from a cached export has not built its network yet."""
        return self.__dict__.get("_build") is None

    @property
    def device_name(self) -> str:
        """``"cpu"``, ``"cuda:0"``...: where the counter runs, without building a waiting network."""
        if not self.network_built:
            return "cpu"
        return str(self.device) if self.device is not None else "cpu"

    @property
    def stride(self) -> int:
        """The input multiple of the network (from the cached export while the network waits)."""
        if not self.network_built:
            return int(self.extra.get("stride", 16))
        return int(getattr(self.net, "stride", 16))

    def describe(self) -> dict:
        """Provenance record: name, kind, file hash, path, training scale."""
        return {
            "model": self.name,
            "kind": self.kind,
            "sha256": self.sha256,
            "path": str(self.path) if self.path else None,
            "diameter": self.diameter,
        }

    def __repr__(self) -> str:
        return f"Counter(kind={self.kind!r}, name={self.name!r}, diameter={self.diameter:g})"

    @property
    def settings(self) -> CounterConfig:
        """The config's settings with the defaults filled in (:class:`CounterConfig`)."""
        return CounterConfig.of(self.config)

    def inference_net(self):
        """The network with BatchNorm folded into the convolutions, made once per weights state."""
        import torch

        from ._nets import fold_batchnorm

        net = self.net
        # every in-place change of a weight (optimiser step, load_state_dict) bumps its tensor's version counter
        stamp = net_stamp(net)
        cached = self.extra.get("inference_net")
        if cached is None or cached[0] != stamp:
            fused = fold_batchnorm(net)
            if self.device is not None and self.device.type == "cpu":
                fused = fused.to(memory_format=torch.channels_last)
            # the network itself is kept with its stamp, so its id cannot be reused by another one
            self.extra["inference_net"] = cached = (stamp, fused, net)
        return cached[1]

    def weights_stamp(self) -> tuple:
        """Identity of the network's current weights (see :func:`net_stamp`)."""
        return net_stamp(self.net)

def _adapt_keys(state: dict, kind: str) -> dict:
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if kind == "regression" and not any(k.startswith("net.") for k in state):
        state = {f"net.{k}": v for k, v in state.items()}
        # timm's classifier is "classifier"; the paper's code may use "_fc" or "fc".
        for old in ("net._fc.", "net.fc."):
            state = {k.replace(old, "net.classifier."): v for k, v in state.items()}
    return state

def _build_loaded(cfg: dict, state: dict, where: Path):
    import torch

    from ._nets import build_net

    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"weights in {where} hold NaN or infinite values ({len(bad)} tensors, e.g. {bad[0]}); "
                         "the model is broken, retrain it")

    try:
        net = build_net(cfg)
    except (KeyError, TypeError, ValueError, RuntimeError, AssertionError, IndexError) as exc:
        raise ValueError(f"the config beside {where} does not describe a network that can be built "
                         f"({type(exc).__name__}: {io.first_line(exc)})") from exc
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights in {where} do not fit the {cfg['kind']} counter config: "
                         f"{io.state_dict_mismatch(net.state_dict(), state)}") from exc
    return net.float().eval()


def _check_config_numbers(cfg: dict, where: Path) -> None:
    """Refuse a counter config whose scale settings are not positive finite numbers."""
    import math

    for key in ("diameter", "sigma", "density_scale", "window", "blocks", "in_chans", "diameter_scale"):
        if key in cfg:
            v = cfg[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{where}: {key!r} must be a positive number, got {v!r}")
