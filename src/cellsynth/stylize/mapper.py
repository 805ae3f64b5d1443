"""The InST style mapper: CLIP image embedding -> one text-token embedding.

Built from diffusers' ``Attention`` blocks with the official module and
parameter names (``attn1``/``attn2`` with ``to_q``/``to_k``/``to_v``/``to_out.0``
and ``net.1``) so that the state dict of an official ``embeddings.pt`` loads into
it unchanged. This module imports torch and diffusers.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

__all__ = ["StyleMapper"]


class StyleMapper(nn.Module):
    """Map a CLIP image embedding to a style-token embedding (official "Attentions").

    ``attn1`` is self-attention on the embedding, ``attn2`` attends from its output
    to the embedding, then ``net`` = Dropout + Linear. No residual, no LayerNorm.
    Both attentions have bias-free q/k/v projections and an output projection
    with bias followed by dropout, as the official ``CrossAttention``.

    Parameters
    ----------
    dim : int
        Embedding width (768 for SD v1 with CLIP ViT-L/14).
    heads, dim_head : int
        Attention heads and their width (official 8 x 64).
    dropout : float
        Dropout rate (official 0.05).

    Examples
    --------
    >>> import torch
    >>> mapper = StyleMapper(16, heads=2, dim_head=4).eval()
    >>> mapper(torch.randn(3, 16)).shape
    torch.Size([3, 16])
    >>> sorted(mapper.state_dict())[:3]
    ['attn1.to_k.weight', 'attn1.to_out.0.bias', 'attn1.to_out.0.weight']
    """

    def __init__(self, dim: int = 768, *, heads: int = 8, dim_head: int = 64, dropout: float = 0.05) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads), ("dim_head", dim_head)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.config = {"dim": dim, "heads": heads, "dim_head": dim_head, "dropout": float(dropout)}
        attention = dict(heads=heads, dim_head=dim_head, dropout=dropout, bias=False, out_bias=True)
        self.attn1 = Attention(dim, **attention)
        self.attn2 = Attention(dim, cross_attention_dim=dim, **attention)
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, dim))

    @classmethod
    def from_state_dict(cls, state: dict, *, heads: int = 8, dropout: float = 0.05) -> "StyleMapper":
        """Build a mapper whose sizes are read from `state` and load it (strictly)."""
        try:
            dim = int(state["net.1.weight"].shape[0])
            inner = int(state["attn1.to_q.weight"].shape[0])
        except KeyError as err:
            raise ValueError(f"not a style-mapper state dict: missing {err.args[0]!r}") from None
        if inner % heads:
            raise ValueError(f"inner width {inner} is not divisible by heads={heads}")
        mapper = cls(dim, heads=heads, dim_head=inner // heads, dropout=dropout)
        try:
            missing, unexpected = mapper.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise ValueError(f"style-mapper weights do not match: {err}") from None
        if missing or unexpected:
            raise ValueError(f"style-mapper weights do not match: missing {missing}, unexpected {unexpected}")
        return mapper.eval()

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, dim) image embeddings -> (B, dim) token embeddings."""
        if image_embeds.ndim != 2 or image_embeds.shape[1] != self.config["dim"]:
            raise ValueError(
                f"image_embeds must have shape (B, {self.config['dim']}), got {tuple(image_embeds.shape)}"
            )
        x = image_embeds[:, None, :]
        x1 = self.attn1(x)
        x2 = self.attn2(x1, encoder_hidden_states=x)
        return self.net(x2)[:, 0, :]
