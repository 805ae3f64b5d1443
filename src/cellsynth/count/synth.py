"""Synthetic nuclei images with strong appearance randomisation, for training counters.

The geometry comes from the Syn-HC generator (:func:`cellsynth.layouts.generate_layout`,
clustered, overlap-limited ellipses) with randomised cell size, density, clustering,
touching and elongation. The appearance is re-rendered to look like fluorescence
nuclei (DAPI/Hoechst): per-cell brightness spread (dim and bright nuclei), dome-shaped
or flat profiles with chromatin texture, optical blur, out-of-focus haze, background
level, illumination gradients and vignetting, uncounted small debris, Poisson and
read noise, gamma, saturation and 8-bit quantisation; elongated nuclei (aspect up to
about 4), bright chromocentres (several maxima in one nucleus) and dim cytoplasm
halos around some nuclei (uncounted). A share of images keeps the
plain Syn-HC appearance. numpy/scipy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
from scipy.ndimage import gaussian_filter

from ..layouts import LayoutParams, generate_layout
from .preprocess import normalize_image

__all__ = ["SynthParams", "synthetic_nuclei"]

RngLike = Union[np.random.Generator, int, None]


@dataclass(frozen=True)
class SynthParams:
    """Ranges of the randomised synthetic nuclei images.

    Parameters
    ----------
    shape : tuple of int
        Image size (rows, cols).
    diameter : tuple of float
        Range of mean cell diameters in pixels (log-uniform).
    coverage : tuple of float
        Range of the fraction of the image area requested to be covered by cells.
    plain_fraction : float
        Share of images kept with the plain Syn-HC appearance.

    Examples
    --------
    >>> SynthParams(shape=(64, 64)).diameter
    (9.0, 24.0)
    >>> SynthParams(coverage=(0.5, 0.1))
    Traceback (most recent call last):
    ...
    ValueError: coverage must be (low, high) with 0 <= low <= high <= 1, got (0.5, 0.1)
    """

    shape: tuple[int, int] = (256, 256)
    diameter: tuple[float, float] = (9.0, 24.0)
    coverage: tuple[float, float] = (0.0, 0.5)
    plain_fraction: float = 0.15

    def __post_init__(self) -> None:
        if len(self.shape) != 2 or min(self.shape) < 16:
            raise ValueError(f"shape must be (rows, cols) with both >= 16, got {self.shape}")
        if not 1 <= self.diameter[0] <= self.diameter[1]:
            raise ValueError(f"diameter must be (low, high) with 1 <= low <= high, got {self.diameter}")
        if not 0 <= self.coverage[0] <= self.coverage[1] <= 1:
            raise ValueError(f"coverage must be (low, high) with 0 <= low <= high <= 1, got {self.coverage}")
        if not 0 <= self.plain_fraction <= 1:
            raise ValueError(f"plain_fraction must be in [0, 1], got {self.plain_fraction}")


def _smooth_noise(rng, shape, sigma) -> np.ndarray:
    n = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    s = n.std()
    return n / s if s > 0 else n


def _layout(params: SynthParams, rng: np.random.Generator, plain: bool):
    rows, cols = params.shape
    d = float(np.exp(rng.uniform(*np.log(params.diameter))))
    cov = rng.uniform(*params.coverage) ** 1.2
    n = cov * rows * cols / (np.pi * d * d / 4)
    lp = LayoutParams(
        shape=(rows, cols),
        count_mean=float(n),
        count_std=float(0.15 * n),
        count_min=0,
        count_max=100000,
        clusters=(1, int(rng.integers(1, 9))),
        cluster_spread=float(rng.uniform(0.08, 0.6)),
        cell_size=d,
        axis_jitter=float(rng.uniform(0.05, 0.35) if rng.random() < 0.5 else rng.uniform(0.35, 0.6)),
        max_overlap=float(rng.uniform(0.0, 0.3)),
        max_tries=10,
        intensity=(150.0, 255.0) if plain else (255.0, 255.0),
        background=(10.0, 30.0),
        noise_std=float(rng.uniform(1, 12)) if plain else 0.0,
        blur_sigma=float(rng.uniform(0, 0.12 * d)) if plain else 0.0,
        contrast=(0.6, 1.3),
        brightness=(-20.0, 20.0),
    )
    return generate_layout(lp, rng=rng), d


def _render(layout, d: float, rng: np.random.Generator) -> np.ndarray:
    labels, cells = layout.labels, layout.cells
    shape = labels.shape
    k = len(cells["row"])
    # Per-cell brightness: log-normal spread, some dim nuclei, a few very bright (mitotic).
    bright = np.exp(rng.normal(0.0, rng.uniform(0.05, 0.5), size=k))
    dim = rng.random(k) < rng.uniform(0.0, 0.25)
    bright[dim] *= rng.uniform(0.15, 0.5, size=int(dim.sum()))
    hot = rng.random(k) < 0.03
    bright[hot] *= rng.uniform(1.5, 3.0, size=int(hot.sum()))
    lut = np.concatenate([[0.0], bright]).astype(np.float32)
    cell = lut[labels]
    inside = labels > 0
    if k and inside.any():
        # Elliptic radius of each pixel within its cell -> dome profile.
        idx = labels[inside].astype(np.intp) - 1
        rr, cc = np.nonzero(inside)
        dy, dx = rr - cells["row"][idx], cc - cells["col"][idx]
        a = cells["angle"][idx]
        u = (dy * np.cos(a) + dx * np.sin(a)) / np.maximum(cells["radius_row"][idx], 0.5)
        v = (dx * np.cos(a) - dy * np.sin(a)) / np.maximum(cells["radius_col"][idx], 0.5)
        rho2 = np.minimum(u * u + v * v, 1.0)
        dome = rng.uniform(-0.1, 0.6)
        cell[inside] *= (1.0 - dome * rho2).astype(np.float32)
        # Chromatin texture.
        tex = rng.uniform(0.0, 0.35)
        if tex > 0:
            noise = _smooth_noise(rng, shape, rng.uniform(0.6, max(0.7, d / 8)))
            cell *= np.clip(1.0 + tex * noise, 0.2, None)
        # Bright chromocentres: a few small spots inside some nuclei (several maxima per nucleus).
        if rng.random() < 0.5:
            n_spots = int(rng.poisson(rng.uniform(0.5, 4.0) * k)) if k else 0
            if n_spots:
                pick = rng.integers(0, len(rr), n_spots)
                spots = np.zeros(shape, np.float32)
                spots[rr[pick], cc[pick]] = rng.uniform(0.5, 2.0, n_spots) * lut[labels[rr[pick], cc[pick]]]
                s = rng.uniform(0.6, max(0.7, d / 10))
                cell += gaussian_filter(spots, s) * (2 * np.pi * s * s) * rng.uniform(0.2, 0.6)
    blur = rng.uniform(0.3, max(0.35, 0.15 * d))
    cell = gaussian_filter(cell, blur)
    img = _surroundings(cell.copy(), cell, labels, inside, bright, d, rng)
    return _acquisition(img, rng)


def _surroundings(img, cell, labels, inside, bright, d: float, rng: np.random.Generator) -> np.ndarray:
    """Dim cytoplasm, out-of-focus haze and debris around the nuclei (added to ``img``)."""
    shape, k = labels.shape, len(bright)
    # Dim cytoplasm around some nuclei (uncounted halo of irregular extent).
    if k and rng.random() < 0.4:
        from scipy.ndimage import grey_dilation

        reach = max(1, int(round(rng.uniform(0.2, 0.8) * d)))
        grown = grey_dilation(labels, size=(2 * reach + 1, 2 * reach + 1))
        halo = (grown > 0) & ~inside
        level = np.concatenate([[0.0], rng.uniform(0.03, 0.2, k) * bright]).astype(np.float32)
        rough = np.clip(1.0 + 0.5 * _smooth_noise(rng, shape, max(1.0, d / 4)), 0.0, None)
        img += gaussian_filter(np.where(halo, level[grown] * rough, 0.0).astype(np.float32), max(0.5, d / 10))
    # Out-of-focus haze around nuclei.
    if rng.random() < 0.5:
        img += rng.uniform(0.0, 0.25) * gaussian_filter(cell, rng.uniform(d / 2, 2 * d))
    # Small uncounted debris.
    n_debris = int(rng.poisson(rng.uniform(0, 8) * np.prod(shape) / 65536))
    if n_debris:
        spots = np.zeros(shape, np.float32)
        spots[rng.integers(0, shape[0], n_debris), rng.integers(0, shape[1], n_debris)] = rng.uniform(0.3, 1.5, n_debris)
        s = rng.uniform(0.5, max(0.6, d / 12))
        img += gaussian_filter(spots, s) * (2 * np.pi * s * s)
    return img


def _acquisition(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Illumination, background, noise, gamma, saturation and quantisation of a rendered field."""
    shape = img.shape
    # Illumination: vignetting and a linear gradient (multiplicative), background (additive).
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    yy, xx = yy / shape[0] - rng.uniform(0.2, 0.8), xx / shape[1] - rng.uniform(0.2, 0.8)
    illum = 1.0 - rng.uniform(0, 0.5) * (yy * yy + xx * xx) + rng.uniform(-0.3, 0.3) * yy + rng.uniform(-0.3, 0.3) * xx
    img *= np.clip(illum, 0.3, None)
    bg = rng.uniform(0.0, 0.35) * (1 + rng.uniform(-0.3, 0.3) * yy + rng.uniform(-0.3, 0.3) * xx)
    img += bg.astype(np.float32)
    if rng.random() < 0.5:  # faint, smooth background texture (uneven mounting medium, autofluorescence)
        img += rng.uniform(0.0, 0.04) * (_smooth_noise(rng, shape, rng.uniform(8, 48)) + 2.0)
    # Noise: shot noise at a random photon budget + Gaussian read noise.
    photons = float(np.exp(rng.uniform(np.log(4), np.log(400))))
    img = rng.poisson(np.clip(img, 0, None) * photons).astype(np.float32) / photons
    img += rng.normal(0.0, rng.uniform(0.0, 0.06), size=shape).astype(np.float32)
    img = np.clip(img, 0, None)
    img = img ** np.float32(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
    if rng.random() < 0.3:
        img = np.minimum(img, np.percentile(img, rng.uniform(97.0, 99.9)))
    if rng.random() < 0.5:
        top = img.max() or 1.0
        img = np.round(img * (rng.uniform(60, 255) / top))
    return img.astype(np.float32)


def synthetic_nuclei(params: SynthParams | None = None, *, rng: RngLike = None):
    """One randomised synthetic nuclei image, normalised, with its cell centres.

    Parameters
    ----------
    params : SynthParams, optional
    rng : numpy.random.Generator or int, optional

    Returns
    -------
    image : ndarray of shape (M, N), float32
        Normalised with :func:`~cellsynth.count.preprocess.normalize_image`.
    centres : ndarray of shape (K, 2)
        True cell centres ``(row, col)``.
    diameter : float
        Mean cell diameter of this image in pixels.

    Examples
    --------
    >>> img, centres, d = synthetic_nuclei(SynthParams(shape=(64, 64)), rng=0)
    >>> img.shape, img.dtype, centres.shape[1]
    ((64, 64), dtype('float32'), 2)
    """
    params = params or SynthParams()
    rng = np.random.default_rng(rng)
    plain = rng.random() < params.plain_fraction
    layout, d = _layout(params, rng, plain)
    raw = layout.image.astype(np.float32) if plain else _render(layout, d, rng)
    return normalize_image(raw), layout.centres.copy(), d
