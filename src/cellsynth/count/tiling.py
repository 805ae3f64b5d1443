"""Tile geometry of counting: where the tiles of a plane go and how their predictions are blended."""

from __future__ import annotations

import numpy as np

__all__ = ["tile_layout", "tile_starts"]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length`` with at least ``overlap`` shared pixels.

    The last tile ends exactly at ``length``; ``length <= tile`` gives one tile.

    Examples
    --------
    >>> tile_starts(600, 256, 32)
    [0, 224, 344]
    >>> tile_starts(100, 256, 32)
    [0]
    """
    if length <= tile:
        return [0]
    step = tile - overlap
    n = int(np.ceil((length - tile) / step)) + 1
    starts = [i * step for i in range(n - 1)] + [length - tile]
    return sorted(set(starts))


def tile_layout(length: int, tile: int, overlap: int, multiple: int = 16) -> tuple[int, list[int]]:
    """Side and start offsets of the fewest tiles of at most ``tile`` pixels covering ``length``.

    Neighbouring tiles share at least ``overlap`` pixels; the tiles are made
    as small as that allows (a multiple of ``multiple``) and spread evenly, so
    little is computed twice: 2112 px with ``tile=256, overlap=32`` takes ten
    tiles of 240 px instead of ten of 256 px. ``length <= tile`` gives one tile
    (``length`` rounded up to ``multiple``; the caller pads).

    Examples
    --------
    >>> tile_layout(2112, 256, 32)
    (240, [0, 208, 416, 624, 832, 1040, 1248, 1456, 1664, 1872])
    >>> tile_layout(100, 256, 32)
    (112, [0])
    """
    if length <= tile:
        return int(np.ceil(length / multiple) * multiple), [0]
    n = int(np.ceil((length - overlap) / (tile - overlap)))
    t = min(int(tile), int(np.ceil((length + (n - 1) * overlap) / n / multiple) * multiple))
    starts = np.round(np.linspace(0, length - t, n)).astype(int)
    return t, sorted(set(int(x) for x in starts))


def _blend_window(tile: int, overlap: int) -> np.ndarray:
    if overlap <= 0:
        return np.ones((tile, tile), np.float32)
    i = np.arange(tile, dtype=np.float32) + 0.5
    ramp = np.clip(np.minimum(i, tile - i) / overlap, 1e-3, 1.0) ** 2
    return np.outer(ramp, ramp).astype(np.float32)


def _pad_to(x: np.ndarray, rows: int, cols: int, value: float = 0.0) -> np.ndarray:
    return np.pad(x, ((0, rows - x.shape[0]), (0, cols - x.shape[1])), mode="constant", constant_values=value)


def _plane_tiles(plane: np.ndarray, tile: int, overlap: int, multiple: int, grid=None):
    """Tiles of one (normalised, rescaled) plane and where they go."""
    if overlap > 0:
        m = overlap
        padded = np.pad(plane, m, mode="symmetric")
    else:
        m = 0
        padded = plane
    rows, cols = padded.shape
    if overlap > 0 and grid is not None:  # laid out by the caller (a chunk of a larger image)
        (t_r, rs), (t_c, cs) = (int(grid[0]), list(grid[1])), (int(grid[2]), list(grid[3]))
        padded = _pad_to(padded, max(rows, t_r), max(cols, t_c))
    elif overlap > 0:
        (t_r, rs), (t_c, cs) = tile_layout(rows, tile, overlap, multiple), tile_layout(cols, tile, overlap, multiple)
        padded = _pad_to(padded, max(rows, t_r), max(cols, t_c))
    else:
        t_r = tile if rows >= tile else int(np.ceil(rows / multiple) * multiple)
        t_c = tile if cols >= tile else int(np.ceil(cols / multiple) * multiple)
        rs = list(range(0, rows, t_r))
        cs = list(range(0, cols, t_c))
        padded = _pad_to(padded, rs[-1] + t_r, cs[-1] + t_c)
    boxes = [(r, c) for r in rs for c in cs]
    tiles = [padded[r:r + t_r, c:c + t_c] for r, c in boxes]
    return tiles, boxes, (t_r, t_c), m, padded.shape
