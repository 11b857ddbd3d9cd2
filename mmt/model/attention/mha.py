"""Dense multi-head self-attention on `scaled_dot_product_attention` (flash / memory-efficient kernels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmt.model.attention.base import SelfAttention
from mmt.model.positional import PositionalEncoding
from mmt.model.registry import ATTENTION


@ATTENTION.register("mha")
class MultiHeadAttention(SelfAttention):
    supports_kv_cache = True

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
        nq, nk = q.shape[2], k.shape[2]
        k_positions = torch.arange(nk, device=q.device)
        bias = pos.score_bias(q_positions, k_positions) if pos is not None else None
        if bias is None and mask is None and (not causal or nq == nk):
            # The fast path: let SDPA pick a fused kernel.
            return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p, is_causal=causal)
        allowed = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
        if causal:
            allowed = k_positions[None, :] <= q_positions[:, None]
        allowed = allowed[None, None]
        if mask is not None:
            allowed = allowed & mask[:, None, None, :]
        if bias is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.dropout_p)
        attn_mask = bias.to(q.dtype)[None].masked_fill(~allowed, torch.finfo(q.dtype).min)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.dropout_p)

    def forward_flops(self, n: int) -> float:
        return 4.0 * n * n * self.dim
