"""Argument types shared by the subcommands, importable without numpy (the parser of one command is built fast)."""

from __future__ import annotations

import argparse

__all__ = ["DIAMETER_RANGE", "positive_float", "cell_diameter", "diameter_or_auto"]

#: Cell diameters a person can mean, in pixels: below one pixel there is nothing to count, and
#: images are rescaled by (the model's diameter / this), so extreme values make absurd image sizes.
DIAMETER_RANGE = (1.0, 4096.0)


def positive_float(text: str) -> float:
    """A positive number.

    >>> positive_float("2.5")
    2.5
    >>> positive_float("0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected a positive number, got '0'
    """
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def cell_diameter(text: str) -> float:
    """A cell diameter in pixels within :data:`DIAMETER_RANGE`."""
    v = positive_float(text)
    low, high = DIAMETER_RANGE
    if not low <= v <= high:
        raise argparse.ArgumentTypeError(f"expected a cell diameter from {low:g} to {high:g} pixels, got {text!r}")
    return v


def diameter_or_auto(text: str):
    """``"auto"`` or a cell diameter in pixels.

    >>> diameter_or_auto("auto"), diameter_or_auto("12")
    ('auto', 12.0)
    """
    return "auto" if text == "auto" else cell_diameter(text)


def add_marker_options(p: argparse.ArgumentParser, *, per: str = "image") -> None:
    """``--measure-channels``, ``--thresholds`` and ``--marker-names`` (``count`` and ``count-batch`` alike;
    parsed by :func:`cellsynth.count.markers.marker_options`). ``per``: what an automatic threshold is chosen for."""
    p.add_argument("--measure-channels", default=None, metavar="C1,C2",
                   help="measure these channels (0-based) in each nucleus and class it marker-positive or negative "
                        "per channel, e.g. 1,2 for Ki67 and EdU beside a nuclear stain counted in --channel 0")
    p.add_argument("--thresholds", default="auto", metavar="auto|V1,V2",
                   help=f"the per-channel intensity above which a nucleus is positive: auto (Otsu's method on each "
                        f"{per}'s nuclei's means, the default) or one number per measured channel")
    p.add_argument("--marker-names", default=None, metavar="NAME1,NAME2",
                   help="names of the measured channels for the classes (default: ch1, ch2 ... by channel number"
                        + (", or the file's channel names)" if per == "image" else ")"))
