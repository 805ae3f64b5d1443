"""The loop above counting: adapt a counter to a user's images without labels, retrain it from corrections.

Importing this package does not import torch; the functions that train import it.

Main entry points
-----------------
estimate_image_stats(image, *, diameter="auto") -> dict
fast_stylize(layout_image, reference, *, rng=None) -> ndarray
adapt_counter(images, *, out, base="default", diameter="auto", minutes=3.0, stylize="auto", ...) -> AdaptResult
retrain_counter(images, points, *, out, base="default", regions=None, diameter="auto", minutes=2.0, ...) -> AdaptResult
"""

from .adapt import AdaptParams, AdaptResult, adapt_counter, label_free_score
from .fast_style import FastStyleParams, fast_stylize, matched_layouts, style_distance
from .retrain import retrain_counter
from .stats import estimate_image_stats

__all__ = [
    "AdaptParams",
    "AdaptResult",
    "FastStyleParams",
    "adapt_counter",
    "estimate_image_stats",
    "fast_stylize",
    "label_free_score",
    "matched_layouts",
    "retrain_counter",
    "style_distance",
]
