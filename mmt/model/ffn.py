"""Feed-forward layers, chosen by ``ffn`` in the config.

Gated kinds (GLU, SwiGLU) use 2/3 of the hidden width so that all kinds have about the same parameter count
for the same ``ffn_mult`` (Shazeer 2020).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmt.model.registry import FFN


def _gated_hidden(dim: int, mult: float) -> int:
    hidden = int(2 * dim * mult / 3)
    return max(8, (hidden + 7) // 8 * 8)


@FFN.register("standard")
class StandardFFN(nn.Module):
    def __init__(self, dim: int, mult: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = int(dim * mult)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(F.gelu(self.fc1(x))))


class _GatedFFN(nn.Module):
    def __init__(self, dim: int, mult: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = _gated_hidden(dim, mult)
        self.w_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(self.drop(self.gate(a) * b))


@FFN.register("glu")
class GLU(_GatedFFN):
    """Dauphin et al. 2017: sigmoid gate."""

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)


@FFN.register("swiglu")
class SwiGLU(_GatedFFN):
    """Shazeer 2020: SiLU (swish) gate."""

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)


def build_ffn(kind: str, dim: int, mult: float, dropout: float = 0.0) -> nn.Module:
    return FFN.get(kind)(dim, mult, dropout)
