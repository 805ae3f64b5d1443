"""Cell counting: density and regression counters on EfficientNet, a classic seeded-watershed counter,
tiled inference on images of any size, training strategies and evaluation.

Importing this package does not import torch or timm; they are imported by the
functions that run models.

Main entry points
-----------------
load_counter(model="default", *, device="auto") -> Counter
count_cells(image, *, counter=None, model="default", diameter="auto", ...) -> CountResult
estimate_diameter(image, *, channel=None) -> float
train_counter(train, *, out, ...) -> TrainResult
evaluate_counter(dataset, *, model=...) -> dict of MAE, RMSE, ACP@5%, ACP@10%

Examples
--------
>>> import numpy as np
>>> from skimage.draw import disk
>>> img = np.zeros((64, 64), np.uint8)
>>> img[disk((20, 20), 6)] = img[disk((44, 40), 6)] = 180
>>> count_cells(img, model="classic", diameter=12).count
2
"""

from .classic import ClassicParams, estimate_diameter
from .infer import CountResult, count_cells, density_peaks
from .metrics import count_metrics, evaluate_counter
from .models import Counter, counter_config, load_counter, save_counter
from .train import TrainConfig, TrainResult, train_counter

__all__ = [
    "ClassicParams",
    "Counter",
    "CountResult",
    "TrainConfig",
    "TrainResult",
    "count_cells",
    "count_metrics",
    "counter_config",
    "density_peaks",
    "estimate_diameter",
    "evaluate_counter",
    "load_counter",
    "save_counter",
    "train_counter",
]
