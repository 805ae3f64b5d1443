"""Syn-HC synthetic cell layouts: generation, hand-drawn rendering, datasets.

numpy/scipy/scikit-image only: importing this package never imports torch.
"""

from .dataset import export_dataset, read_dataset
from .generate import CELL_COLUMNS, Layout, generate_layout, render_layout
from .params import LayoutParams

__all__ = [
    "CELL_COLUMNS",
    "Layout",
    "LayoutParams",
    "export_dataset",
    "generate_layout",
    "read_dataset",
    "render_layout",
]
