"""Weights-free stylization: make a synthetic image look like a real one, on the CPU in milliseconds.

Three measured steps, each moving one statistic of the synthetic image towards
the reference's:

1. low-frequency Fourier amplitude transfer: the amplitude spectrum of the
   slow variations (illumination, background haze, period longer than
   ``1 / low_freq`` pixels) is blended towards the reference's, the phase (the
   cells' positions) is kept;
2. intensity histogram matching (:func:`skimage.exposure.match_histograms`);
3. noise matching: pixel noise is estimated in the dark and the bright pixels of
   both images (from neighbour differences); Gaussian noise with the missing
   variance (interpolated in intensity) is added, then the histogram is matched
   again.

Also here: :func:`matched_layouts`, labelled synthetic nuclei whose size and
density follow estimated image stats. numpy/scipy/scikit-image only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from ..count.preprocess import normalize_image

__all__ = ["FastStyleParams", "fast_stylize", "style_distance", "noise_levels", "matched_layouts"]

RngLike = Union[np.random.Generator, int, None]


@dataclass(frozen=True)
class FastStyleParams:
    """Settings of :func:`fast_stylize`.

    Parameters
    ----------
    low_freq : float
        Frequencies below this (cycles per pixel) take the reference's amplitude.
    amplitude_weight : float
        Blend weight of the reference's low-frequency amplitude, in [0, 1].
    match_noise : bool
        Add noise up to the reference's level.

    Examples
    --------
    >>> FastStyleParams().low_freq
    0.02
    >>> FastStyleParams(amplitude_weight=2)
    Traceback (most recent call last):
    ...
    ValueError: amplitude_weight must be in [0, 1], got 2
    """

    low_freq: float = 0.02
    amplitude_weight: float = 1.0
    match_noise: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.low_freq <= 0.5:
            raise ValueError(f"low_freq must be in (0, 0.5] cycles per pixel, got {self.low_freq!r}")
        if not 0 <= self.amplitude_weight <= 1:
            raise ValueError(f"amplitude_weight must be in [0, 1], got {self.amplitude_weight!r}")


def _plane(image, name: str) -> np.ndarray:
    x = np.asarray(image)
    if x.ndim != 2 or min(x.shape) < 8:
        raise ValueError(f"{name} must be a 2D image of at least 8x8 pixels, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _fit_reference(ref: np.ndarray, shape, rng: np.random.Generator) -> np.ndarray:
    """A random ``shape`` window of ``ref``, mirrored when ``ref`` is smaller."""
    pr, pc = max(0, shape[0] - ref.shape[0]), max(0, shape[1] - ref.shape[1])
    if pr or pc:
        ref = np.pad(ref, ((0, pr), (0, pc)), mode="symmetric")
    r0 = int(rng.integers(0, ref.shape[0] - shape[0] + 1))
    c0 = int(rng.integers(0, ref.shape[1] - shape[1] + 1))
    return ref[r0:r0 + shape[0], c0:c0 + shape[1]]


def noise_levels(image: np.ndarray) -> tuple[float, float, float, float]:
    """Pixel noise in the dark and the bright pixels: ``(dark_level, dark_sigma, bright_level, bright_sigma)``.

    The noise is the robust spread of horizontal neighbour differences divided
    by sqrt 2, in pixels below the 50th and above the 90th intensity percentile.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> img = np.full((128, 128), 10.0); img[:, 64:] = 100.0
    >>> img += rng.normal(0, 2.0, img.shape)
    >>> lv, sd, lb, sb = noise_levels(img)
    >>> round(sd), round(sb)
    (2, 2)
    """
    x = np.asarray(image, np.float32)
    d = (x[:, 1:] - x[:, :-1]) / np.sqrt(2.0)
    m = 0.5 * (x[:, 1:] + x[:, :-1])
    lo, hi = np.percentile(m, [50, 90])
    out = []
    for sel in (m <= lo, m >= hi):
        v = d[sel]
        if v.size < 16:
            out += [float(np.mean(m)), 0.0]
            continue
        out += [float(np.median(m[sel])), float(1.4826 * np.median(np.abs(v - np.median(v))))]
    return tuple(out)


def _match(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    from skimage.exposure import match_histograms

    return match_histograms(x, ref).astype(np.float32)


def fast_stylize(
    layout_image: np.ndarray,
    reference: np.ndarray,
    *,
    rng: RngLike = None,
    params: Optional[FastStyleParams] = None,
) -> np.ndarray:
    """Make a synthetic image look like a reference image, without any weights.

    Parameters
    ----------
    layout_image : ndarray of shape (M, N)
        The synthetic image (e.g. a rendered layout); cell positions are kept.
    reference : ndarray of shape (P, Q)
        A real image at the same pixel scale (cells of the same size in pixels);
        a random ``(M, N)`` window of it is the style (mirrored when smaller).
    rng : numpy.random.Generator or int, optional
        Chooses the window and draws the added noise.
    params : FastStyleParams, optional

    Returns
    -------
    ndarray of shape (M, N), float32
        In the reference's intensity range (its histogram).

    Raises
    ------
    ValueError, TypeError
        Not 2D real images, or non-finite values.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> layout = np.zeros((64, 64), np.float32); layout[20:30, 20:30] = 1.0
    >>> ref = rng.poisson(20.0, (100, 120)).astype(np.uint16)
    >>> out = fast_stylize(layout, ref, rng=0)
    >>> out.shape, out.dtype, bool(ref.min() <= out.min() and out.max() <= ref.max())
    ((64, 64), dtype('float32'), True)
    """
    params = params or FastStyleParams()
    rng = np.random.default_rng(rng)
    x = _plane(layout_image, "layout_image")
    ref = _fit_reference(_plane(reference, "reference"), x.shape, rng)
    xn, rn = normalize_image(x), normalize_image(ref)
    # 1. low-frequency amplitude transfer
    fx, fr = np.fft.fft2(xn), np.fft.fft2(rn)
    fy = np.fft.fftfreq(x.shape[0])[:, None]
    fxq = np.fft.fftfreq(x.shape[1])[None, :]
    w = params.amplitude_weight * np.exp(-(fy ** 2 + fxq ** 2) / (params.low_freq ** 2))
    amp = (1 - w) * np.abs(fx) + w * np.abs(fr)
    y = np.real(np.fft.ifft2(amp * np.exp(1j * np.angle(fx)))).astype(np.float32)
    # 2. histogram
    y = _match(y, ref)
    # 3. noise, interpolated in intensity between the dark and the bright pixels
    if params.match_noise:
        ld, sd, lb, sb = noise_levels(ref)
        yd, yds, yb, ybs = noise_levels(y)
        var_d, var_b = max(0.0, sd ** 2 - yds ** 2), max(0.0, sb ** 2 - ybs ** 2)
        if var_d > 0 or var_b > 0:
            t = np.clip((y - ld) / (lb - ld), 0, 1) if lb > ld else np.zeros_like(y)
            sigma = np.sqrt((1 - t) * var_d + t * var_b).astype(np.float32)
            y = _match(y + sigma * rng.standard_normal(y.shape).astype(np.float32), ref)
    return y


def style_distance(a: np.ndarray, b: np.ndarray) -> dict:
    """How far apart two images' looks are: histogram, noise and low-frequency spectrum.

    Returns a dict: ``histogram`` (mean absolute difference of the 1-99th
    percentiles of the raw intensities, relative to ``b``'s 1-99 range),
    ``noise`` (``|log|`` ratio of the dark-pixel noise levels), ``spectrum``
    (mean ``|log|`` ratio of the radially averaged power of the normalised
    images at periods longer than 16 pixels).

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> a = rng.normal(0, 1, (64, 64))
    >>> style_distance(a, a)["histogram"]
    0.0
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    q = np.linspace(1, 99, 41)
    pa, pb = np.percentile(a, q), np.percentile(b, q)
    hist = float(np.mean(np.abs(pa - pb)) / max(pb[-1] - pb[0], 1e-12))
    na, nb = noise_levels(a)[1], noise_levels(b)[1]
    noise = float(abs(np.log((na + 1e-6 * (pb[-1] - pb[0]) + 1e-12) / (nb + 1e-6 * (pb[-1] - pb[0]) + 1e-12))))

    def radial(x):
        x = normalize_image(x)
        n = min(x.shape)
        x = x[:n, :n]
        p = np.abs(np.fft.fft2(x - x.mean())) ** 2
        f = np.hypot(np.fft.fftfreq(n)[:, None], np.fft.fftfreq(n)[None, :])
        bins = np.linspace(1.0 / n, 1.0 / 16, 6)
        idx = np.digitize(f, bins)
        return np.array([p[idx == i].mean() if np.any(idx == i) else 0 for i in range(1, len(bins))]) + 1e-9

    spec = float(np.mean(np.abs(np.log(radial(a) / radial(b)))))
    return {"histogram": hist, "noise": noise, "spectrum": spec}


def matched_layouts(
    stats: dict,
    n: int,
    *,
    shape: tuple[int, int] = (256, 256),
    scale: float = 1.0,
    references: Sequence[np.ndarray] = (),
    rng: RngLike = None,
    params: Optional[FastStyleParams] = None,
    progress=None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Labelled synthetic nuclei images matching estimated stats, stylized like the references.

    Parameters
    ----------
    stats : dict
        ``diameter`` (px in the user's images) and ``foreground_fraction``, as from
        :func:`~cellsynth.adapt.estimate_image_stats` / ``combine_stats``.
    n : int
        Number of images.
    shape : tuple of int
        Size of each image at the working scale.
    scale : float
        Working scale relative to the user's images (cells are ``scale * diameter`` px).
    references : sequence of ndarray
        Real images at the working scale; each layout is stylized like a random
        one with :func:`fast_stylize`. None given: the synthetic look is kept.
    rng : numpy.random.Generator or int, optional
    params : FastStyleParams, optional

    Returns
    -------
    list of (image, centres)
        ``image`` normalised float32 ``(M, N)``, ``centres`` ``(K, 2)``.

    Examples
    --------
    >>> out = matched_layouts({"diameter": 12.0, "foreground_fraction": 0.1}, 2, shape=(64, 64), rng=0)
    >>> len(out), out[0][0].shape
    (2, (64, 64))
    """
    from ..count.synth import SynthParams, synthetic_nuclei

    if int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    rng = np.random.default_rng(rng)
    d = float(stats["diameter"]) * float(scale)
    fg = float(np.clip(stats.get("foreground_fraction", 0.15), 0.005, 0.6))
    # synthetic_nuclei covers u ** 1.2 of the area for a requested u: ask for 0.6x to 1.5x the foreground.
    cov = (min(1.0, (0.6 * fg) ** (1 / 1.2)), min(1.0, (1.5 * fg) ** (1 / 1.2)))
    sp = SynthParams(shape=tuple(int(s) for s in shape), diameter=(max(1.0, 0.85 * d), max(1.0, 1.15 * d)),
                     coverage=cov, plain_fraction=0.0)
    out = []
    for k in range(int(n)):
        img, centres, _ = synthetic_nuclei(sp, rng=rng)
        if len(references):
            ref = references[int(rng.integers(0, len(references)))]
            img = normalize_image(fast_stylize(img, ref, rng=rng, params=params))
        out.append((img.astype(np.float32), np.asarray(centres, float).reshape(-1, 2)))
        if progress is not None:  # one event per layout: a Cancel is seen between two layouts
            from ..progress import report

            report(progress, "layouts", k + 1, int(n))
    return out
