"""Overlapping tiles and blending weights for images of any size."""

from __future__ import annotations

import numpy as np

__all__ = ["tile_starts", "tile_origins", "blend_window"]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length`` with at least ``overlap``.

    Examples
    --------
    >>> tile_starts(100, 64, 16)
    [0, 36]
    >>> tile_starts(64, 64, 16)
    [0]
    """
    if tile <= 0 or overlap < 0 or overlap >= tile:
        raise ValueError(f"need tile > overlap >= 0, got tile={tile}, overlap={overlap}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    n = int(np.ceil((length - tile) / stride)) + 1
    return [int(round(i * (length - tile) / (n - 1))) for i in range(n)]


def tile_origins(shape: tuple, tile: int, overlap: int) -> list[tuple[int, int]]:
    """All ``(row, col)`` tile origins for an image of ``shape`` (each side >= tile)."""
    return [(r, c) for r in tile_starts(shape[0], tile, overlap) for c in tile_starts(shape[1], tile, overlap)]


def blend_window(tile: int, overlap: int) -> np.ndarray:
    """Weights of shape (tile, tile): 1 inside, linear ramps over ``overlap`` at the borders.

    Examples
    --------
    >>> w = blend_window(16, 4)
    >>> float(w[8, 8]), bool(w[0, 0] > 0)
    (1.0, True)
    """
    ramp = np.ones(tile, np.float32)
    if overlap > 0:
        edge = (np.arange(overlap, dtype=np.float32) + 1) / (overlap + 1)
        ramp[:overlap] = edge
        ramp[-overlap:] = np.minimum(ramp[-overlap:], edge[::-1])
    return np.outer(ramp, ramp)
