"""Cross-attention: queries from one sequence, keys and values from another (fusion, decoder)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmt.model.attention.base import safe_key_mask


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0, context_dim: int | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.dim, self.heads, self.head_dim, self.dropout = dim, heads, dim // heads, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        cache: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """``cache`` (decoding): the context's keys/values are projected once and reused at every step."""
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        if cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            m = context.shape[1]
            k, v = self.kv(context).view(b, m, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            if cache is not None:
                cache["k"], cache["v"] = k, v
        mask = safe_key_mask(context_mask)
        attn_mask = mask[:, None, None, :] if mask is not None else None
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.dim))

    def forward_flops(self, n: int, m: int) -> float:
        return 4.0 * n * m * self.dim
