"""Parameters of NSC masks and of virtual staining, each in one validated frozen dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["NSCParams", "StainParams", "BACKBONES", "FOREGROUND_MODES", "SCHEDULERS", "PRESETS", "stain_preset"]

#: Feature backbones NSC can use: a multi-scale filter bank (no weights) or DINO models.
BACKBONES = ("filters", "dinov2-small", "dino-vits8")
#: How NSC chooses foreground clusters.
FOREGROUND_MODES = ("auto", "brightest", "all")
#: Samplers of the staining pipeline.
SCHEDULERS = ("ddim", "ddpm")

#: The UNet of the shipped demo model (``resources/models/stain-demo``, built by
#: ``python -m cellsynth.tools.train_demo``); the staining dock trains a small model of this size.
DEMO_MODEL = {"block_out_channels": [32, 64, 128], "layers_per_block": 1, "norm_num_groups": 16,
              "attention_head_dim": 8, "dropout": 0.0, "prediction_type": "v_prediction"}


def _f(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field carrying its help text and limits (read by the CLI and the widgets)."""
    return field(default=default, metadata={"help": help, **meta})


def _validate(obj: Any, skip: tuple = ()) -> None:
    """Check types, ranges and choices of every field but ``skip``, from the field metadata."""
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        choices = f.metadata.get("choices")
        if choices is not None:
            if value not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
            continue
        if isinstance(f.default, bool):
            if not isinstance(value, (bool, int)):
                raise ValueError(f"{f.name} must be True or False, got {value!r}")
            object.__setattr__(obj, f.name, bool(value))
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{f.name} must be a number, got {value!r}")
        if isinstance(f.default, int) and int(value) != value:
            raise ValueError(f"{f.name} must be an integer, got {value!r}")
        value = type(f.default)(value)
        object.__setattr__(obj, f.name, value)
        low, high = f.metadata.get("low"), f.metadata.get("high")
        if value != value or (low is not None and value < low) or (high is not None and value > high):
            rng = f"[{low:g}, {high:g}]" if high is not None else f">= {low:g}"
            raise ValueError(f"{f.name} must be in {rng}, got {value!r}")


class _ParamsMixin:
    def to_dict(self) -> dict:
        """Plain JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """Build from :meth:`to_dict` output; unknown keys raise ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; expected some of {sorted(names)}")
        return cls(**d)


@dataclass(frozen=True)
class NSCParams(_ParamsMixin):
    """Neural spectral clustering (NSC) masks, as in DiffStain section 2.2.

    The image is cut into square fields of view of ``fov`` pixels, each resized to
    ``input_size`` pixels and described by a grid of ``input_size // patch`` patch
    features. Each field of view is embedded jointly with a shared anchor field of
    view; the first ``r`` non-trivial eigenvectors of the normalised affinity are
    clustered into ``k`` clusters, synchronised through the anchor.

    Raises
    ------
    ValueError
        Naming the parameter and the accepted values.

    Examples
    --------
    >>> NSCParams().k, NSCParams().r, NSCParams().grid
    (5, 5, 28)
    >>> NSCParams(k=1)
    Traceback (most recent call last):
    ...
    ValueError: k must be in [2, 32], got 1
    """

    k: int = _f(5, "number of clusters (k-means in the spectral embedding)", low=2, high=32)
    r: int = _f(5, "number of non-trivial eigenvectors of the normalised Laplacian", low=1, high=64)
    fov: int = _f(112, "side of a field of view in image pixels", low=16, high=4096)
    input_size: int = _f(224, "side of a field of view after resizing, in backbone input pixels", low=32, high=1024)
    patch: int = _f(8, "patch size in backbone input pixels (one graph node per patch)", low=1, high=64)
    backbone: str = _f("filters", "feature backbone: multi-scale filter bank (no weights) or a DINO model",
                       choices=BACKBONES)
    foreground: str = _f("auto", "foreground clusters: 'auto' (the brighter group of clusters by Otsu's criterion, "
                         "edges refined per pixel, with every pixel above the image's Otsu threshold), 'brightest' "
                         "(one cluster) or 'all' (keep every cluster label)",
                         choices=FOREGROUND_MODES)
    refine_boundaries: bool = _f(True, "move pixels where patch clusters meet to the neighbouring cluster of "
                                 "closest mean intensity (pixel-accurate edges)")
    n_init: int = _f(4, "k-means restarts", low=1, high=100)
    seed: int = _f(0, "seed of k-means and of the eigensolver's start vector", low=0, high=2**31 - 1)

    def __post_init__(self) -> None:
        _validate(self)
        if self.input_size % self.patch:
            raise ValueError(f"input_size ({self.input_size}) must be a multiple of patch ({self.patch})")
        if self.grid < 2:
            raise ValueError(f"input_size // patch must be >= 2, got {self.grid}")
        if self.r + 1 >= 2 * self.grid ** 2:
            raise ValueError(f"r ({self.r}) must be below the number of graph nodes ({2 * self.grid ** 2} - 1)")

    @property
    def grid(self) -> int:
        """Patches per field-of-view side."""
        return self.input_size // self.patch


@dataclass(frozen=True)
class StainParams(_ParamsMixin):
    """Sampling settings of the virtual staining pipeline.

    ``scheduler`` 'ddpm' runs the model's full training schedule (2000 steps in
    the paper); 'ddim' runs ``steps`` deterministic steps (``eta`` 0). With
    ``guidance`` the sampler starts at ``guidance_strength`` of the schedule from
    NSC masks (scaled into the model's target space) noised by the forward process;
    ``refine`` further rounds compute NSC masks on the result and denoise again.

    Examples
    --------
    >>> StainParams().steps
    50
    >>> StainParams(scheduler="euler")
    Traceback (most recent call last):
    ...
    ValueError: scheduler must be one of 'ddim', 'ddpm', got 'euler'
    """

    scheduler: str = _f("ddim", "sampler: 'ddim' (few steps) or 'ddpm' (the full training schedule)",
                        choices=SCHEDULERS)
    steps: int = _f(50, "DDIM steps (ignored by 'ddpm', which uses every training step)", low=1, high=10000)
    eta: float = _f(0.0, "DDIM eta (0: deterministic for a seed)", low=0.0, high=1.0)
    guidance: bool = _f(False, "start from NSC masks noised to guidance_strength (mask guidance; off by default: it lowered PCC on the demo model, see its README)")
    guidance_strength: float = _f(0.6, "fraction of the schedule that mask guidance re-noises to", low=0.01, high=1.0)
    refine: int = _f(1, "guided rounds; each computes NSC masks on the previous result", low=1, high=10)
    tile: int = _f(0, "tile size in pixels (0: the model's sample size)", low=0, high=4096)
    overlap: int = _f(16, "overlap between tiles in pixels", low=0, high=2048)
    batch_size: int = _f(8, "tiles denoised together", low=1, high=256)
    seed: int = _f(0, "seed of the initial noise", low=0, high=2**31 - 1)

    def __post_init__(self) -> None:
        _validate(self)
        if self.tile and self.overlap >= self.tile:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than tile ({self.tile})")


#: Named settings of virtual staining: ``"fast"`` (the default) and ``"paper"``.
PRESETS = ("fast", "paper")
#: DDIM steps of the fast preset.
FAST_STEPS = 10


def stain_preset(name: str = "fast") -> tuple[StainParams, NSCParams]:
    """Sampling and NSC settings of a named preset.

    ``"fast"``: 10 DDIM steps, no mask guidance, filter-bank NSC (no weights): a
    512x512 plane in about 40 s on two CPU cores (the shipped demo model counts
    held-out simulated pairs as well at 10 steps as at 50: PCC 0.939 vs 0.930). ``"paper"``: DiffStain as published: the model's full training schedule
    (DDPM, 2000 steps for the paper's models), NSC mask guidance on with one round of
    refinement from the generated channels, 512-pixel tiles, and NSC on DINO ViT-S/8
    features as the public code computes them (each 256-pixel quarter of a 512 tile
    upscaled to 512, 64 x 64 = 4096 patches) with the paper's k = r = 5. It needs the
    DINO weights (``cellsynth.weights``) and is meant for a GPU.

    Parameters
    ----------
    name : {"fast", "paper"}

    Returns
    -------
    (StainParams, NSCParams)

    Examples
    --------
    >>> params, nsc = stain_preset("paper")
    >>> params.scheduler, params.guidance, params.tile, nsc.backbone, nsc.grid ** 2
    ('ddpm', True, 512, 'dino-vits8', 4096)
    >>> stain_preset("slow")
    Traceback (most recent call last):
    ...
    ValueError: preset must be one of 'fast', 'paper', got 'slow'
    """
    if name == "fast":
        return StainParams(steps=FAST_STEPS), NSCParams()
    if name == "paper":
        return (StainParams(scheduler="ddpm", guidance=True, refine=2, tile=512, overlap=64, batch_size=1),
                NSCParams(backbone="dino-vits8", fov=256, input_size=512, patch=8, k=5, r=5))
    raise ValueError(f"preset must be one of {', '.join(map(repr, PRESETS))}, got {name!r}")
