"""InST stylization of matched layouts, used only when Stable Diffusion weights are on disk and CUDA is present.

torch, diffusers and transformers are imported inside the functions.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..progress import ProgressCallback, report

__all__ = ["inst_available", "inst_stylize"]

SD_MODEL = "sd-v1-4"
IMAGE_ENCODER = "clip-vit-large-patch14"


def inst_available() -> tuple[bool, str]:
    """``(True, "")`` when InST can run here (CUDA and local weights), else ``(False, why)``; never downloads."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "InST stylization needs a CUDA GPU and none is available"
    from ..weights import WeightsNotFoundError, resolve

    for name in (SD_MODEL, IMAGE_ENCODER):
        try:
            resolve(name, offline=True)
        except (WeightsNotFoundError, ValueError) as exc:
            return False, f"InST stylization needs the {name} weights on disk: {exc}"
    return True, ""


def inst_stylize(
    layouts: Sequence[tuple[np.ndarray, np.ndarray]],
    references: Sequence[np.ndarray],
    *,
    token_steps: int = 200,
    strength: float = 0.5,
    steps: int = 20,
    seed: int = 0,
    progress: Optional[ProgressCallback] = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Learn a style token from the references, then stylize each layout like a random reference (positions kept)."""
    from ..count.preprocess import normalize_image
    from ..stylize import StylizeParams, TrainParams, load_pipeline, train_token

    pipe = load_pipeline(SD_MODEL, image_encoder=IMAGE_ENCODER, device="cuda", offline=True)
    styles = [np.clip(normalize_image(r), 0, 1) for r in references]
    token = train_token(styles, pipe, params=TrainParams(steps=int(token_steps), seed=int(seed), checkpoint_every=0),
                        encoder=IMAGE_ENCODER).token
    rng = np.random.default_rng(seed)
    params = StylizeParams(strength=strength, num_inference_steps=steps, size=0, seed=int(seed))
    out = []
    for i, (img, centres) in enumerate(layouts):
        style = styles[int(rng.integers(0, len(styles)))]
        res = pipe(np.clip(img, 0, 1), style, token, params=params)
        out.append((normalize_image(np.asarray(res.image, np.float32)), centres))
        report(progress, "stylize", i + 1, len(layouts), "InST")
    return out
