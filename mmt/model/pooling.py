"""Sequence -> fixed-size vectors, chosen by ``pool`` in the config.

`AttentionPool` is attentional pooling (learned queries cross-attending over the sequence, as in CoCa / Set
Transformer's PMA); `forward_queries` gives all (B, Q, D) query outputs, `forward` their mean.
"""

from __future__ import annotations

import torch
from torch import nn

from mmt.model.attention.cross import CrossAttention
from mmt.model.registry import POOLING


@POOLING.register("attention")
class AttentionPool(nn.Module):
    def __init__(self, dim: int, heads: int, num_queries: int = 1) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.attn = CrossAttention(dim, heads)
        self.norm = nn.LayerNorm(dim)

    def forward_queries(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q = self.queries.to(x.dtype).expand(x.shape[0], -1, -1)
        return self.norm(self.attn(q, x, mask))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_queries(x, mask).mean(dim=1)

    def forward_flops(self, n: int) -> float:
        """Forward FLOPs over n tokens: query and output projections of the queries, keys/values of the tokens,
        and the attention products."""
        q, d = self.queries.shape
        a = self.attn
        linear = 2.0 * q * (a.q.weight.numel() + a.proj.weight.numel()) + 2.0 * n * a.kv.weight.numel()
        return linear + a.forward_flops(q, n)


@POOLING.register("mean")
class MeanPool(nn.Module):
    def __init__(self, dim: int, heads: int, num_queries: int = 1) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return x.mean(dim=1)
        w = mask.to(x.dtype)[..., None]
        return (x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)

    def forward_flops(self, n: int) -> float:
        return 0.0  # no matmul


@POOLING.register("first")
class FirstTokenPool(nn.Module):
    """The first token (``bos`` for text), as a [CLS] token."""

    def __init__(self, dim: int, heads: int, num_queries: int = 1) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x[:, 0]

    def forward_flops(self, n: int) -> float:
        return 0.0


def build_pool(kind: str, dim: int, heads: int, num_queries: int = 1) -> nn.Module:
    return POOLING.get(kind)(dim, heads, num_queries)
