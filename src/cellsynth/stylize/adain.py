"""Adaptive instance normalisation of latents (InST step 2)."""

from __future__ import annotations

__all__ = ["latent_adain", "channel_stats"]


def channel_stats(latent, *, eps: float = 1e-5):
    """Per-channel spatial mean and std of a latent, as InST computes them.

    Parameters
    ----------
    latent : ndarray or torch.Tensor of shape (B, C, H, W)
    eps : float
        Added to the unbiased variance before the square root.

    Returns
    -------
    mean, std : arrays or tensors of shape (B, C, 1, 1)

    Examples
    --------
    >>> import numpy as np
    >>> mean, std = channel_stats(np.arange(8.0).reshape(1, 2, 2, 2), eps=0.0)
    >>> mean.ravel().tolist(), np.round(std.ravel(), 4).tolist()
    ([1.5, 5.5], [1.291, 1.291])
    """
    if latent.ndim != 4:
        raise ValueError(f"latent must have shape (B, C, H, W), got shape {tuple(latent.shape)}")
    if latent.shape[2] * latent.shape[3] < 2:
        raise ValueError(f"latent needs at least 2 spatial positions, got shape {tuple(latent.shape)}")
    b, c = latent.shape[:2]
    flat = latent.reshape(b, c, -1)
    if hasattr(flat, "detach"):  # torch
        mean = flat.mean(dim=2)
        var = flat.var(dim=2, unbiased=True)
    else:
        mean = flat.mean(axis=2)
        var = flat.var(axis=2, ddof=1)
    std = (var + eps) ** 0.5
    return mean.reshape(b, c, 1, 1), std.reshape(b, c, 1, 1)


def latent_adain(content, style, *, eps: float = 1e-5):
    """Give `content` the per-channel spatial mean and std of `style`.

    ``(content - mean_c) / std_c * std_s + mean_s`` per latent channel, with
    unbiased variances plus `eps` as in the official InST code. The two latents
    may differ in spatial size.

    Parameters
    ----------
    content : ndarray or torch.Tensor of shape (B, C, H, W)
    style : ndarray or torch.Tensor of shape (B or 1, C, H2, W2)
    eps : float

    Returns
    -------
    Same type and shape as `content`.

    Raises
    ------
    ValueError
        If the channel counts differ or the shapes are not 4-D.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> c = rng.normal(0, 1, (1, 4, 8, 8)); s = rng.normal(3, 2, (1, 4, 6, 10))
    >>> out = latent_adain(c, s)
    >>> np.allclose(channel_stats(out)[0], channel_stats(s)[0])
    True
    >>> np.allclose(channel_stats(out, eps=0)[1] ** 2 + 1e-5, channel_stats(s)[1] ** 2, rtol=1e-3)
    True
    """
    if content.ndim != 4 or style.ndim != 4:
        raise ValueError(f"latents must be 4-D (B, C, H, W); got {tuple(content.shape)} and {tuple(style.shape)}")
    if content.shape[1] != style.shape[1]:
        raise ValueError(f"content has {content.shape[1]} channels but style has {style.shape[1]}")
    mean_c, std_c = channel_stats(content, eps=eps)
    mean_s, std_s = channel_stats(style, eps=eps)
    return (content - mean_c) / std_c * std_s + mean_s
