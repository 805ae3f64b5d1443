"""Parameters of the Syn-HC layout generator, in one validated frozen dataclass."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LayoutParams"]


def _f(default: Any, help: str, **limits: Any) -> Any:
    """A dataclass field carrying its help text and limits (used by the CLI and widget)."""
    return field(default=default, metadata={"help": help, **limits})


@dataclass(frozen=True)
class LayoutParams:
    """Everything the Syn-HC generator needs, validated once.

    The defaults follow the InST-Microscopy paper (3-7 clusters, 15 px cells,
    at most 10 % overlap, at most 600 cells) and the public generator's
    appearance (background 10-30 plus N(0, 5) noise, contrast x0.8-1.2,
    brightness -20..20, 8-bit output). The requested count follows a gamma
    distribution of mean ``count_mean`` and std ``count_std``, truncated to
    ``[count_min, count_max]`` by re-drawing (see
    :func:`~cellsynth.layouts.generate.requested_count`); the defaults are set so
    that the *placed* counts of 256x256 layouts reproduce the paper's Table 1
    (101.32 +- 76.43 cells per image); ``benchmarks/bench_layouts.py`` measures it.

    Raises
    ------
    ValueError
        Naming the parameter and the accepted range, for any bad value.

    Examples
    --------
    >>> LayoutParams(shape=(128, 128)).cell_size
    15.0
    >>> LayoutParams(max_overlap=1.5)
    Traceback (most recent call last):
    ...
    ValueError: max_overlap must be in [0, 1], got 1.5
    """

    shape: tuple[int, int] = _f((256, 256), "image size (rows, cols) in pixels", low=8, high=16384)
    count_mean: float = _f(99.0, "mean of the (gamma) distribution of requested cell counts", low=0.0)
    count_std: float = _f(97.0, "standard deviation of the requested cell count (0: always count_mean)", low=0.0)
    count_min: int = _f(10, "smallest requested cell count (smaller draws are re-drawn)", low=0)
    count_max: int = _f(600, "largest requested cell count (larger draws are re-drawn)", low=0, high=100000)
    clusters: tuple[int, int] = _f((3, 7), "range of the number of cluster centres (inclusive)", low=1, high=1000)
    cluster_spread: float = _f(
        0.2, "standard deviation of cell positions around their cluster centre, as a fraction of the shorter image side", low=0.0
    )
    cell_size: float = _f(15.0, "mean cell diameter in pixels", low=1.0)
    axis_jitter: float = _f(
        0.2, "each semi-axis is cell_size/2 x U(1 - jitter, 1 + jitter)", low=0.0, high=0.95
    )
    rotation: bool = _f(True, "rotate each ellipse by a random angle")
    intensity: tuple[float, float] = _f((150.0, 255.0), "range of cell intensities (uniform)", low=0.0, high=255.0)
    max_overlap: float = _f(0.10, "largest fraction of a new cell's area that may overlap earlier cells", low=0.0, high=1.0)
    max_tries: int = _f(20, "attempts to place a cell before it is dropped", low=1, high=10000)
    background: tuple[float, float] = _f((10.0, 30.0), "range of the per-image background level", low=0.0, high=255.0)
    noise_std: float = _f(5.0, "standard deviation of the per-pixel Gaussian noise", low=0.0)
    blur_sigma: float = _f(0.0, "Gaussian blur of the cells before noise (soft edges), in pixels", low=0.0)
    contrast: tuple[float, float] = _f((0.8, 1.2), "range of the random contrast factor", low=0.0)
    brightness: tuple[float, float] = _f((-20.0, 20.0), "range of the random brightness offset", low=-255.0, high=255.0)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(f.default, tuple):
                if not (isinstance(value, (tuple, list)) and len(value) == 2):
                    raise ValueError(f"{f.name} must be a pair of numbers, got {value!r}")
                value = tuple(type(f.default[0])(v) for v in value)
                object.__setattr__(self, f.name, value)
                items = value
                if f.name != "shape" and items[0] > items[1]:
                    raise ValueError(f"{f.name} must be (low, high) with low <= high, got {value!r}")
            elif isinstance(f.default, bool):
                if not isinstance(value, (bool, int)):
                    raise ValueError(f"{f.name} must be True or False, got {value!r}")
                object.__setattr__(self, f.name, bool(value))
                continue
            else:
                try:
                    cast = type(f.default)(value)
                except (TypeError, ValueError):
                    raise ValueError(f"{f.name} must be a number, got {value!r}") from None
                if isinstance(f.default, int) and cast != value:
                    raise ValueError(f"{f.name} must be an integer, got {value!r}")
                object.__setattr__(self, f.name, cast)
                items = (cast,)
            low, high = f.metadata.get("low"), f.metadata.get("high")
            for v in items:
                if not math.isfinite(v):
                    raise ValueError(f"{f.name} must be a finite number, got {getattr(self, f.name)!r}")
                if (low is not None and v < low) or (high is not None and v > high):
                    rng = f"[{low:g}, {high:g}]" if high is not None else f">= {low:g}"
                    raise ValueError(f"{f.name} must be in {rng}, got {getattr(self, f.name)!r}")
        if self.count_min > self.count_max:
            raise ValueError(
                f"count_min ({self.count_min}) must not exceed count_max ({self.count_max})"
            )
        if self.cell_size > 2 * max(self.shape):
            raise ValueError(
                f"cell_size ({self.cell_size:g} px) must not exceed twice the image's longer side "
                f"({2 * max(self.shape)} px for shape {tuple(self.shape)})"
            )

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "LayoutParams":
        """Build from :meth:`to_dict` output; unknown keys raise ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown layout parameters {sorted(unknown)}; expected some of {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
