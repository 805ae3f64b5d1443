"""Simulated brightfield / fluorescence pairs rendered from the same cells.

Cells come from the Syn-HC layout generator (:mod:`cellsynth.layouts`); every
cell gets a nucleus (a smaller ellipse near its centre) with one to three
nucleoli, and its cytoplasm holds a few granules. From that geometry:

- five fluorescence channels with distinct structures: **DNA** (nuclei, per-cell
  brightness), **ER** (cytoplasm, brighter around the nucleus), **RNA**
  (cytoplasm plus bright nucleoli), **AGP** (the plasma membrane: a ring at the
  cell edge), **Mito** (puncta at the granules, in the cytoplasm); blurred, with
  background and camera noise;
- three brightfield planes at focus offsets -1, 0, +1: the optical path
  ``phi`` (cell body, nucleus, nucleoli, granules, with the same per-cell
  density as DNA) gives defocus contrast ``1 + a z LoG(phi)`` plus a weak
  absorption, under uneven illumination, with noise.

So every fluorescence structure has a brightfield signature (learnable), but only
through defocus contrast, halos and noise (not trivial).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..progress import ProgressCallback, report

__all__ = ["StainPair", "simulate_stain_pair", "simulate_stain_pairs", "CHANNELS", "PLANES"]

#: Fluorescence channel names of the simulated pairs, in order.
CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")
#: Brightfield plane names (focus offsets).
PLANES = ("z-1", "z0", "z+1")

RngLike = Union[np.random.Generator, int, None, list]


@dataclass(frozen=True)
class StainPair:
    """One simulated field of view.

    Attributes
    ----------
    brightfield : ndarray of shape (3, M, N), uint16
    fluorescence : ndarray of shape (5, M, N), uint16
    cells, nuclei : ndarray of shape (M, N), uint16
        Instance labels of cells and nuclei.
    """

    brightfield: np.ndarray
    fluorescence: np.ndarray
    cells: np.ndarray
    nuclei: np.ndarray


def _ring(labels: np.ndarray, width: float) -> np.ndarray:
    from scipy import ndimage as ndi

    inside = labels > 0
    dist_in = ndi.distance_transform_edt(inside)
    # boundaries between touching cells too
    edges = np.zeros_like(inside)
    edges[:-1] |= labels[:-1] != labels[1:]
    edges[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    dist_edge = ndi.distance_transform_edt(~edges)
    d = np.minimum(np.where(inside, dist_in, np.inf), dist_edge)
    return np.exp(-0.5 * (d / width) ** 2) * (inside | edges)


def simulate_stain_pair(shape: tuple = (128, 128), *, rng: RngLike = None, cell_size: float = 30.0,
                        n_cells: float = 12.0) -> StainPair:
    """Render one brightfield / fluorescence pair from one set of cells.

    Parameters
    ----------
    shape : (int, int)
        Image size.
    rng : numpy.random.Generator or int, optional
        Random source or seed.
    cell_size : float
        Mean cell diameter in pixels.
    n_cells : float
        Mean number of cells requested per 128x128 pixels (the layout generator
        drops cells that overlap too much).

    Returns
    -------
    StainPair

    Examples
    --------
    >>> pair = simulate_stain_pair((64, 64), rng=0)
    >>> pair.brightfield.shape, pair.fluorescence.shape, pair.fluorescence.dtype
    ((3, 64, 64), (5, 64, 64), dtype('uint16'))
    """
    from scipy import ndimage as ndi

    from ..layouts import LayoutParams, generate_layout, render_layout

    rng = np.random.default_rng(rng)
    m, n = int(shape[0]), int(shape[1])
    area = m * n / (128.0 * 128.0)
    mean = n_cells * area
    lp = LayoutParams(shape=(m, n), count_mean=mean, count_std=mean * 0.3, count_min=1,
                      count_max=max(2, int(mean * 3)), clusters=(2, 4), cluster_spread=0.3, cell_size=cell_size,
                      axis_jitter=0.25, max_overlap=0.05, noise_std=0.0)
    lay = generate_layout(lp, rng=rng)
    cells, tab = lay.labels, lay.cells
    k = lay.n_cells
    # nuclei: smaller ellipses near the cell centres
    scale = rng.uniform(0.4, 0.55, size=k)
    nuc_tab = {
        "row": tab["row"] + rng.normal(0, 1.5, k), "col": tab["col"] + rng.normal(0, 1.5, k),
        "radius_row": tab["radius_row"] * scale, "radius_col": tab["radius_col"] * scale,
        "angle": tab["angle"] + rng.normal(0, 0.3, k),
    }
    nuclei = render_layout(nuc_tab, params=lp, rng=0).labels if k else np.zeros((m, n), np.uint16)
    nuclei = np.where(cells > 0, nuclei, 0).astype(np.uint16)
    density = np.concatenate([[0.0], rng.uniform(0.75, 1.25, size=max(k, 1))])  # per-cell brightness
    cyto = (cells > 0) & (nuclei == 0)
    rows, cols = np.mgrid[0:m, 0:n]
    # nucleoli: 1-3 small spots inside each nucleus; granules: 4-10 spots in each cytoplasm
    nucleoli = np.zeros((m, n), np.float32)
    granules = np.zeros((m, n), np.float32)
    for lab in range(1, k + 1):
        nuc_pix = np.flatnonzero(nuclei.ravel() == lab)
        if nuc_pix.size > 8:
            for p in rng.choice(nuc_pix, size=rng.integers(1, 4), replace=False):
                nucleoli.flat[p] = 1.0
        cyt_pix = np.flatnonzero((cyto & (cells == lab)).ravel())
        if cyt_pix.size > 20:
            for p in rng.choice(cyt_pix, size=min(cyt_pix.size, int(rng.integers(4, 11))), replace=False):
                granules.flat[p] = rng.uniform(0.7, 1.3)
    nucleoli = ndi.gaussian_filter(nucleoli, 1.2) * (2 * np.pi * 1.2 ** 2)
    granules = ndi.gaussian_filter(granules, 1.0) * (2 * np.pi * 1.0 ** 2)
    dens = density[cells].astype(np.float32)
    nuc = (nuclei > 0).astype(np.float32)
    dist_nuc = ndi.distance_transform_edt(nuclei == 0)
    perinuclear = np.exp(-dist_nuc / (0.25 * cell_size)) * cyto
    membrane = _ring(cells, 1.2)
    blur = lambda a, s=1.0: ndi.gaussian_filter(a.astype(np.float32), s)  # noqa: E731

    dna = blur(nuc * dens, 1.0)
    er = blur(cyto * (0.35 + 0.65 * perinuclear), 1.5)
    rna = blur(cyto * 0.4 + nuc * 0.15, 1.5) + 0.9 * nucleoli
    agp = blur(membrane, 0.8) + 0.15 * blur(cyto, 2.0)
    mito = 0.9 * granules + 0.08 * blur(cyto, 2.0)
    fl = np.stack([dna, er, rna, agp, mito]).astype(np.float32)
    levels = rng.uniform(0.85, 1.15, size=(5, 1, 1)).astype(np.float32)  # per-image staining level
    fl = 0.04 + fl * levels + rng.normal(0, 0.015, fl.shape).astype(np.float32)
    fl_u16 = np.clip(np.rint(fl * 3000.0), 0, 65535).astype(np.uint16)

    # brightfield: optical path phi, defocus contrast, absorption, illumination, noise
    body = blur(cells > 0, 1.0)
    phi = 0.5 * body * blur(dens, 1.0) + 0.6 * blur(nuc * dens, 1.0) + 0.8 * nucleoli + 0.7 * granules
    ramp = rng.normal(0, 1, 3)
    illum = 1.0 + 0.08 * (ramp[0] * (rows / m - 0.5) + ramp[1] * (cols / n - 0.5)) \
        + 0.04 * np.sin(2 * np.pi * (rows / m * ramp[2] + 0.3))
    planes = []
    for z in (-1.0, 0.0, 1.0):
        sigma = 1.0 + 1.5 * abs(z)
        contrast = -0.9 * z * ndi.gaussian_laplace(phi, sigma) * sigma ** 2
        absorb = 0.06 * blur(phi, sigma)
        planes.append(illum * (1.0 + contrast - absorb))
    bf = np.stack(planes).astype(np.float32)
    bf = bf + rng.normal(0, 0.02, bf.shape).astype(np.float32)
    bf_u16 = np.clip(np.rint(bf * 20000.0), 0, 65535).astype(np.uint16)
    return StainPair(brightfield=bf_u16, fluorescence=fl_u16, cells=cells, nuclei=nuclei)


def simulate_stain_pairs(
    out: os.PathLike | str,
    n: int,
    *,
    seed: int = 0,
    shape: tuple = (128, 128),
    overwrite: bool = False,
    progress: Optional[ProgressCallback] = None,
) -> Path:
    """Write ``n`` simulated pairs in the paired-data folder layout (:mod:`cellsynth.stain.data`).

    Field of view ``i`` uses the seed ``[seed, i]``, so a longer set starts with a
    shorter one. A ``stain_pairs.json`` records how the pairs were made.

    Parameters
    ----------
    out : path-like
        Folder to fill (created; must be empty or hold pairs of these settings,
        unless ``overwrite``). An interrupted run of the same settings resumes; a
        smaller ``n`` removes the surplus fields of view.
    n : int
        Number of fields of view.
    seed : int
    shape : (int, int)
    overwrite : bool
        Replace pairs of other settings (only the files this function writes).
    progress : ProgressCallback, optional
        One event per field of view (stage ``"pairs"``).

    Returns
    -------
    Path
        The folder.

    Raises
    ------
    ValueError
        If ``n`` < 1 or the shape is too small.
    FileExistsError
        If the folder holds other files or pairs of other settings and
        ``overwrite`` is False, or a ``stain_pairs.json`` that is not ours.

    Examples
    --------
    >>> import tempfile
    >>> from cellsynth.stain.data import read_stain_dataset
    >>> ds = read_stain_dataset(simulate_stain_pairs(tempfile.mkdtemp(), 2, shape=(48, 48)))
    >>> len(ds), ds.channels, ds.brightfield
    (2, ('DNA', 'ER', 'RNA', 'AGP', 'Mito'), ('z-1', 'z0', 'z+1'))
    """
    from .. import io

    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if len(shape) != 2 or min(shape) < 16:
        raise ValueError(f"shape must be two sizes >= 16, got {shape!r}")
    out, n = Path(out), int(n)
    record = {"format": PAIRS_FORMAT, "version": 1, "generator": "cellsynth.stain.simulate_stain_pair",
              "seed": int(seed), "shape": [int(v) for v in shape], "channels": list(CHANNELS),
              "brightfield": list(PLANES)}
    done = _pairs_to_keep(out, record, n, overwrite)
    if (out / PAIRS_RECORD).exists():  # ours (checked above)
        _remove_pair_files(out, keep=done)
    doc = {**record, "n": n, "complete": done == n}
    io.write_json(out / PAIRS_RECORD, doc, overwrite=True)
    report(progress, "pairs", done, n)
    for i in range(done, n):
        _write_pair(out, i, record)
        if i == n - 1:
            io.write_json(out / PAIRS_RECORD, {**doc, "complete": True}, overwrite=True)
        report(progress, "pairs", i + 1, n)
    from .._provenance import record, write_into

    write_into(out, record("simulate-stain-pairs", parameters=doc))
    return out


PAIRS_FORMAT = "cellsynth.stain-pairs"
PAIRS_RECORD = "stain_pairs.json"
_FOV = re.compile(r"^fov_(\d{4,})$")


def _pair_files(i: int) -> list:
    """The files of field of view ``i``, relative to the folder, in the order they are written."""
    return ([f"fov_{i:04d}/brightfield/{j}_{name}.tif" for j, name in enumerate(PLANES)]
            + [f"fov_{i:04d}/fluorescence/{j}_{name}.tif" for j, name in enumerate(CHANNELS)])


def _write_pair(out: Path, i: int, record: dict) -> None:
    from .data import write_stain_pair

    pair = simulate_stain_pair(tuple(record["shape"]), rng=[record["seed"], i])
    write_stain_pair(out / f"fov_{i:04d}", pair.brightfield, pair.fluorescence, brightfield_names=PLANES,
                     channel_names=CHANNELS, overwrite=True)


def _pairs_to_keep(out: Path, record: dict, n: int, overwrite: bool) -> int:
    """How many leading fields of view an earlier run of the same settings finished.

    Raises FileExistsError for a folder holding anything else: a record that is
    not ours always, other files or pairs of other settings unless ``overwrite``.
    """
    from .. import io

    path = out / PAIRS_RECORD
    if not path.exists():
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"{out} is not empty and holds no simulated pairs; choose an empty or new folder")
        return 0
    old = io.read_json(path)
    if not isinstance(old, dict) or old.get("format") != PAIRS_FORMAT:
        raise FileExistsError(f"{path} is not a record of simulated pairs (format {PAIRS_FORMAT!r}); "
                              "choose an empty or new folder")
    if any(old.get(k) != v for k, v in record.items() if k != "version"):
        if not overwrite:
            raise FileExistsError(f"{out} holds simulated pairs of another seed or size; choose a new folder "
                                  "or pass overwrite=True to replace them")
        return 0
    done = 0
    while done < n and all((out / f).is_file() for f in _pair_files(done)):
        done += 1
    return done


def _remove_pair_files(out: Path, *, keep: int) -> None:
    """Remove the files of fields of view >= ``keep`` (only the names this module writes,
    never through a symbolic link), folders left empty, and stale temporary files."""
    from .. import io

    io.remove_stale_parts(out, names=(PAIRS_RECORD,))
    for fov in sorted(out.iterdir()):
        m = _FOV.match(fov.name)
        if not m or not fov.is_dir() or fov.is_symlink():
            continue
        i = int(m.group(1))
        for sub in ("brightfield", "fluorescence"):
            io.remove_stale_parts(fov / sub)
        if i < keep:
            continue
        for rel in _pair_files(i):
            f = out / rel
            if f.is_file() and not f.is_symlink() and not f.parent.is_symlink():
                f.unlink()
        for folder in (fov / "brightfield", fov / "fluorescence", fov):
            if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
                folder.rmdir()
