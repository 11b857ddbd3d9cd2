"""Positional encodings, chosen by ``positional`` in the config.

They act at three different places, so each kind implements the hook it needs and inherits no-ops for the rest:
absolute kinds (learned, sinusoidal) add to the token embeddings (`embed`), rotary rotates queries and keys
(`rotate`), relative adds a per-head bias to the attention scores (`score_bias`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmt.model.registry import POSITIONAL


class PositionalEncoding(nn.Module):
    """No position information; the base of every kind."""

    uses_bias = False

    def __init__(self, dim: int, heads: int, max_len: int, bidirectional: bool = True) -> None:
        super().__init__()
        self.dim, self.heads, self.max_len, self.bidirectional = dim, heads, max_len, bidirectional

    def embed(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return x

    def rotate(self, t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return t

    def score_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
        return None

    def _check_len(self, n: int) -> None:
        if n > self.max_len:
            raise ValueError(
                f"sequence of {n} positions exceeds max_len={self.max_len} of the positional table"
            )


POSITIONAL.register("none")(PositionalEncoding)


@POSITIONAL.register("learned")
class LearnedPositional(PositionalEncoding):
    def __init__(self, dim: int, heads: int, max_len: int, bidirectional: bool = True) -> None:
        super().__init__(dim, heads, max_len, bidirectional)
        self.table = nn.Embedding(max_len, dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def embed(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        self._check_len(offset + x.shape[1])
        return x + self.table.weight[offset : offset + x.shape[1]].to(x.dtype)


def sinusoid_table(n: int, dim: int) -> torch.Tensor:
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n, dim)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv[: dim // 2])
    return table


@POSITIONAL.register("sinusoidal")
class SinusoidalPositional(PositionalEncoding):
    """Vaswani et al. 2017, fixed (no parameters)."""

    def __init__(self, dim: int, heads: int, max_len: int, bidirectional: bool = True) -> None:
        super().__init__(dim, heads, max_len, bidirectional)
        self.register_buffer("table", sinusoid_table(max_len, dim), persistent=False)

    def embed(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        self._check_len(offset + x.shape[1])
        return x + self.table[offset : offset + x.shape[1]].to(x.dtype)


@POSITIONAL.register("rotary")
class RotaryPositional(PositionalEncoding):
    """Su et al. 2021 (RoPE): rotate (q, k) pairs by position-dependent angles, so scores depend on i - j only."""

    def __init__(
        self, dim: int, heads: int, max_len: int, bidirectional: bool = True, base: float = 10000.0
    ) -> None:
        super().__init__(dim, heads, max_len, bidirectional)
        head_dim = dim // heads
        if head_dim % 2:
            raise ValueError(f"rotary needs an even head dim, got {head_dim} (dim={dim}, heads={heads})")
        self.register_buffer(
            "inv_freq",
            1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim),
            persistent=False,
        )

    def rotate(self, t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        angles = positions.to(torch.float32)[..., None] * self.inv_freq  # (..., N, hd/2)
        cos, sin = angles.cos().to(t.dtype), angles.sin().to(t.dtype)
        t1, t2 = t[..., 0::2], t[..., 1::2]
        out = torch.stack((t1 * cos - t2 * sin, t1 * sin + t2 * cos), dim=-1)
        return out.flatten(-2)


@POSITIONAL.register("relative")
class RelativePositionBias(PositionalEncoding):
    """Raffel et al. 2020 (T5): a learned per-head bias for log-bucketed relative distances j - i."""

    uses_bias = True

    def __init__(
        self,
        dim: int,
        heads: int,
        max_len: int,
        bidirectional: bool = True,
        num_buckets: int = 32,
        max_distance: int = 128,
    ) -> None:
        super().__init__(dim, heads, max_len, bidirectional)
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.bias = nn.Embedding(num_buckets, heads)
        nn.init.zeros_(self.bias.weight)

    def bucket(self, rel: torch.Tensor) -> torch.Tensor:
        n = self.num_buckets
        ret = torch.zeros_like(rel)
        if self.bidirectional:
            n //= 2
            ret = ret + (rel > 0).long() * n
            rel = rel.abs()
        else:
            rel = (-rel).clamp(min=0)
        exact = n // 2
        is_small = rel < exact
        large = (
            exact
            + (
                torch.log(rel.float().clamp(min=1) / exact)
                / math.log(self.max_distance / exact)
                * (n - exact)
            ).long()
        )
        large = large.clamp(max=n - 1)
        return ret + torch.where(is_small, rel, large)

    def score_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        rel = k_pos[..., None, :] - q_pos[..., :, None]  # (..., Nq, Nk)
        bias = self.bias(self.bucket(rel))  # (..., Nq, Nk, H)
        return bias.movedim(-1, 0)  # (H, ..., Nq, Nk)


def build_positional(
    kind: str, dim: int, heads: int, max_len: int, bidirectional: bool = True
) -> PositionalEncoding:
    return POSITIONAL.get(kind)(dim, heads, max_len, bidirectional)
