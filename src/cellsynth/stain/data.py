"""Paired brightfield / fluorescence data in folders of TIFFs.

Layout (one folder per field of view; order within a folder from the sorted file
names, a leading ``<digits>_`` sorting as a number; that prefix is dropped from a
file name to give the channel name, so ``0_DNA.tif`` is channel "DNA" and comes
before ``1_ER.tif``, and ``2_x.tif`` before ``10_y.tif``)::

    DATA_DIR/
      stain_pairs.json            optional: how the pairs were made
      fov_0000/
        brightfield/0_z-2.tif 1_z0.tif 2_z+2.tif     condition planes, each (M, N)
        fluorescence/0_DNA.tif 1_ER.tif ...           target channels, each (M, N)
      fov_0001/
        ...

Every field of view must hold the same plane and channel names and one image
size per folder (sizes may differ between folders).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .. import io

__all__ = ["StainDataset", "read_stain_dataset", "write_stain_pair", "channel_name"]

_TIFF = (".tif", ".tiff")
_PREFIX = re.compile(r"^\d+_")


def channel_name(path: os.PathLike | str) -> str:
    """Channel name of a file: its stem without a leading ``<digits>_``.

    Examples
    --------
    >>> channel_name("fov_0000/fluorescence/3_AGP.tif"), channel_name("Mito.tiff")
    ('AGP', 'Mito')
    """
    stem = Path(path).name
    for ext in _TIFF:
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
    return _PREFIX.sub("", stem)


def _order(path: Path) -> tuple:
    """Sort key: a leading ``<digits>_`` counts as a number (``2_ER`` before ``10_AGP``), then the name."""
    match = _PREFIX.match(path.name)
    return (int(match.group()[:-1]) if match else -1, path.name)


def _tiffs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _TIFF), key=_order)


def _read_finite(path: Path) -> np.ndarray:
    data = io.read_tiff(path)[0]
    if np.issubdtype(data.dtype, np.inexact) and not np.all(np.isfinite(data)):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise ValueError(f"{path} holds {bad} NaN or infinite pixel values; staining data must be finite numbers")
    return data


@dataclass(frozen=True)
class StainDataset:
    """A folder of paired fields of view.

    Attributes
    ----------
    root : Path
    fovs : list of Path
        Field-of-view folders, sorted by name.
    brightfield : tuple of str
        Condition plane names, in order.
    channels : tuple of str
        Target channel names, in order.
    """

    root: Path
    fovs: list
    brightfield: tuple
    channels: tuple

    def __len__(self) -> int:
        return len(self.fovs)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(brightfield (B, M, N), fluorescence (C, M, N))`` of field of view ``i``, float32."""
        fov = self.fovs[i]
        bf = [_read_finite(p) for p in _tiffs(fov / "brightfield")]
        fl = [_read_finite(p) for p in _tiffs(fov / "fluorescence")]
        shapes = {a.shape for a in bf + fl}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"{fov}: every plane and channel must be one 2-D image of one size, got {sorted(shapes)}")
        return np.stack(bf).astype(np.float32), np.stack(fl).astype(np.float32)


def _check_complete(root: Path, found: int) -> None:
    """Refuse a folder whose ``stain_pairs.json`` says that its writing was interrupted."""
    record = root / "stain_pairs.json"
    if not record.is_file():
        return
    doc = io.read_json(record)
    if not isinstance(doc, dict) or doc.get("format") != "cellsynth.stain-pairs":
        return
    n = doc.get("n")
    if doc.get("complete") is False or (isinstance(n, int) and found < n):
        raise ValueError(f"{root} is incomplete: {found} of {n} fields of view were written (an interrupted "
                         "simulate-stain-pairs); run it again with the same settings to finish the folder")


def read_stain_dataset(path: os.PathLike | str) -> StainDataset:
    """Open a paired-data folder and check that its fields of view agree.

    Raises
    ------
    FileNotFoundError
        If the folder does not exist.
    ValueError
        If it holds no field of view, fields of view disagree on names, or its
        ``stain_pairs.json`` says that it is incomplete.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no such paired-data folder: {root}")
    subs = sorted(p for p in root.iterdir() if p.is_dir())
    half = [p for p in subs if (p / "brightfield").is_dir() != (p / "fluorescence").is_dir()]
    if half:
        has, lacks = ("brightfield", "fluorescence") if (half[0] / "brightfield").is_dir() else ("fluorescence",
                                                                                                 "brightfield")
        raise ValueError(f"{half[0]} has a '{has}/' folder but no '{lacks}/' folder ({len(half)} field(s) of view "
                         f"like it); every field of view needs both, paired plane by plane")
    fovs = [p for p in subs if (p / "brightfield").is_dir() and (p / "fluorescence").is_dir()]
    _check_complete(root, len(fovs))
    if not fovs:
        raise ValueError(
            f"{root} holds no field of view; expected sub-folders with 'brightfield/' and 'fluorescence/' "
            "folders of TIFF files (see cellsynth.stain.data)"
        )
    names = None
    for fov in fovs:
        bf = tuple(channel_name(p) for p in _tiffs(fov / "brightfield"))
        fl = tuple(channel_name(p) for p in _tiffs(fov / "fluorescence"))
        if not bf or not fl:
            raise ValueError(f"{fov}: 'brightfield/' and 'fluorescence/' must each hold at least one TIFF")
        if names is None:
            names = (bf, fl)
        elif (bf, fl) != names:
            raise ValueError(f"{fov} has planes {bf} and channels {fl}; {fovs[0].name} has {names[0]} and {names[1]}")
    return StainDataset(root=root, fovs=fovs, brightfield=names[0], channels=names[1])


def write_stain_pair(
    folder: os.PathLike | str,
    brightfield: np.ndarray,
    fluorescence: np.ndarray,
    *,
    brightfield_names: Sequence[str],
    channel_names: Sequence[str],
    overwrite: bool = False,
    pixel_size: Optional[float] = None,
) -> Path:
    """Write one field of view in the paired-data layout (``<i>_<name>.tif`` files).

    Parameters
    ----------
    folder : path-like
        The field-of-view folder to create.
    brightfield : ndarray of shape (B, M, N)
    fluorescence : ndarray of shape (C, M, N)
        uint8, uint16 or float32.
    """
    folder = Path(folder)
    bf, fl = np.asarray(brightfield), np.asarray(fluorescence)
    if bf.ndim != 3 or fl.ndim != 3 or bf.shape[1:] != fl.shape[1:]:
        raise ValueError(f"expected (B, M, N) and (C, M, N) of one size, got {bf.shape} and {fl.shape}")
    if len(brightfield_names) != len(bf) or len(channel_names) != len(fl):
        raise ValueError("one name per plane and per channel is needed")
    for sub, data, names in (("brightfield", bf, brightfield_names), ("fluorescence", fl, channel_names)):
        for i, (plane, name) in enumerate(zip(data, names)):
            io.write_tiff(folder / sub / f"{i}_{name}.tif", plane, overwrite=overwrite, pixel_size=pixel_size)
    return folder
