"""Normalisation layers, chosen by ``norm`` in the config."""

from __future__ import annotations

import torch
from torch import nn

from mmt.model.registry import NORM


@NORM.register("layernorm")
class LayerNorm(nn.LayerNorm):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__(dim, eps=eps)


@NORM.register("rmsnorm")
class RMSNorm(nn.Module):
    """Zhang & Sennrich 2019: scale by the root mean square, no centring, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.to(x.dtype) * self.weight


@NORM.register("scalenorm")
class ScaleNorm(nn.Module):
    """Nguyen & Salazar 2019: ``g * x / ||x||`` with one learned scalar ``g`` initialised to sqrt(dim)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.tensor(float(dim) ** 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.float().norm(dim=-1, keepdim=True).clamp(min=self.eps)
        return (self.scale * x.float() / norm).to(x.dtype)


def build_norm(kind: str, dim: int) -> nn.Module:
    return NORM.get(kind)(dim)
