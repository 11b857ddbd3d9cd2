"""The pre-norm residual block and a stack of them (a tower).

`TransformerBlock` is the unit the training side wraps for activation checkpointing; the model never does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmt.config.model import ModelConfig
from mmt.model.attention.cross import CrossAttention
from mmt.model.ffn import build_ffn
from mmt.model.norms import build_norm
from mmt.model.positional import PositionalEncoding, build_positional
from mmt.model.registry import ATTENTION


class TransformerBlock(nn.Module):
    """x + attn(norm(x)) [+ cross(norm(x), context)] + ffn(norm(x))."""

    def __init__(self, spec: ModelConfig, cross: bool = False, context_dim: int | None = None) -> None:
        super().__init__()
        self.norm1 = build_norm(spec.norm, spec.dim)
        self.attn = ATTENTION.get(spec.attention.kind)(spec.dim, spec.num_heads, spec.attention)
        self.cross = CrossAttention(spec.dim, spec.num_heads, spec.dropout, context_dim) if cross else None
        self.norm_cross = build_norm(spec.norm, spec.dim) if cross else None
        self.norm2 = build_norm(spec.norm, spec.dim)
        self.ffn = build_ffn(spec.ffn, spec.dim, spec.ffn_mult, spec.dropout)
        self.drop = nn.Dropout(spec.dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        pos: PositionalEncoding | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        cache: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        self_cache = cache.setdefault("self", {"offset": cache["offset"]}) if cache is not None else None
        if self_cache is not None:
            self_cache["offset"] = cache["offset"]
        x = x + self.drop(self.attn(self.norm1(x), mask=mask, causal=causal, pos=pos, cache=self_cache))
        if self.cross is not None:
            if context is None:
                raise ValueError("this block cross-attends: pass context")
            cross_cache = cache.setdefault("cross", {}) if cache is not None else None
            x = x + self.drop(self.cross(self.norm_cross(x), context, context_mask, cache=cross_cache))
        return x + self.drop(self.ffn(self.norm2(x)))

    def forward_flops(self, n: int, context_len: int = 0) -> float:
        """Forward FLOPs (2 per multiply-add) for n tokens: each linear layer on the length it really sees (the
        cross-attention keys/values on the context), plus the attention products of the kind."""
        kv = self.cross.kv if self.cross is not None else None
        total = sum(
            2.0 * mod.weight.numel() * (context_len if mod is kv else n)
            for mod in self.modules()
            if isinstance(mod, nn.Linear)
        )
        total += self.attn.forward_flops(n)
        if self.cross is not None:
            total += self.cross.forward_flops(n, context_len)
        return total


class Tower(nn.Module):
    """Positional encoding + ``depth`` blocks + a final norm over an already embedded sequence."""

    def __init__(
        self,
        spec: ModelConfig,
        max_len: int,
        causal: bool = False,
        cross: bool = False,
        context_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.spec, self.causal = spec, causal
        self.pos = build_positional(
            spec.positional, spec.dim, spec.num_heads, max_len, bidirectional=not causal
        )
        self.blocks = nn.ModuleList(TransformerBlock(spec, cross, context_dim) for _ in range(spec.depth))
        self.norm = build_norm(spec.norm, spec.dim)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        caches: list[dict[str, Any]] | None = None,
        offset: int = 0,
    ) -> torch.Tensor:
        x = self.pos.embed(x, offset)
        for i, blk in enumerate(self.blocks):
            cache = None
            if caches is not None:
                cache = caches[i]
                cache["offset"] = offset
            x = blk(
                x,
                mask=mask,
                causal=self.causal,
                pos=self.pos,
                context=context,
                context_mask=context_mask,
                cache=cache,
            )
        return self.norm(x)

    def forward_flops(self, n: int, context_len: int = 0) -> float:
        """Training FLOPs (forward + backward = 3x forward) of this tower for one sequence of n tokens."""
        return 3.0 * sum(blk.forward_flops(n, context_len) for blk in self.blocks)
