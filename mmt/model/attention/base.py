"""What every self-attention kind shares: the fused QKV projection, rotary, and the output projection.

A kind implements only `attend(q, k, v, ...)` on (B, H, N, head_dim) tensors, so the kinds differ in exactly
the part the papers differ in.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmt.config.model import AttentionConfig
from mmt.model.positional import PositionalEncoding


def safe_key_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, N) bool, True = real. A row with no real key (a sample without this modality) attends everywhere
    instead, so softmax stays finite; its outputs are garbage that the losses never read."""
    if mask is None:
        return None
    return mask | ~mask.any(dim=-1, keepdim=True)


def masked_fill_min(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)


class SelfAttention(nn.Module):
    supports_kv_cache = False
    supports_score_bias = True
    # Shared-QK kinds (Reformer) project only queries and values; the keys are the queries.
    shared_qk = False

    def __init__(self, dim: int, heads: int, cfg: AttentionConfig) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.dim, self.heads, self.head_dim, self.cfg = dim, heads, dim // heads, cfg
        self.qkv = nn.Linear(dim, (2 if self.shared_qk else 3) * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        pos: PositionalEncoding | None = None,
        cache: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """``cache`` (decoding): a dict holding past keys/values; ``cache["offset"]`` is the first position of x."""
        b, n, _ = x.shape
        if self.shared_qk:
            q, v = self.qkv(x).view(b, n, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            k = q
        else:
            q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        offset = cache.get("offset", 0) if cache is not None else 0
        positions = torch.arange(offset, offset + n, device=x.device)
        if pos is not None:
            q, k = pos.rotate(q, positions), pos.rotate(k, positions)
        if cache is not None:
            if not self.supports_kv_cache:
                raise RuntimeError(f"{type(self).__name__} has no KV cache")
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        out = self.attend(q, k, v, safe_key_mask(mask), causal, pos, positions)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.dim))

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool,
        pos: PositionalEncoding | None,
        q_positions: torch.Tensor,
    ) -> torch.Tensor:
        raise NotImplementedError

    def forward_flops(self, n: int) -> float:
        """Multiply-add FLOPs of the score and value products for one sequence of n tokens (forward only)."""
        raise NotImplementedError

    @property
    def dropout_p(self) -> float:
        return self.cfg.dropout if self.training else 0.0
