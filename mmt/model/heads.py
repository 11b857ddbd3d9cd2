"""Task heads: CLIP-style contrastive projections with a learnable temperature, and VQA answer classification.
(The captioning LM head is the decoder's tied output projection.)"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmt.config.model import HeadsConfig


class ContrastiveHead(nn.Module):
    """Projects each modality's pooled vector into one shared, L2-normalised space (Radford et al. 2021)."""

    def __init__(self, cfg: HeadsConfig, dims: dict[str, int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.proj = nn.ModuleDict({m: nn.Linear(d, cfg.embed_dim, bias=False) for m, d in dims.items()})
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

    def forward(
        self, pooled: dict[str, torch.Tensor], with_scale: bool = False
    ) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Embeddings; with ``with_scale`` also `scale()`, computed inside this forward so that the temperature
        is used within its own module's call (sharded engines such as ZeRO-3 lose its gradient otherwise)."""
        emb = {m: F.normalize(self.proj[m](v), dim=-1) for m, v in pooled.items()}
        return (emb, self.scale()) if with_scale else emb

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at ``max_logit_scale`` (CLIP clamps at 100 to keep training stable)."""
        return self.logit_scale.clamp(max=math.log(self.cfg.max_logit_scale)).exp()


class VQAHead(nn.Module):
    """Answer classification over the fused vector (an MLP, as in the VQA baselines)."""

    def __init__(self, dim: int, num_answers: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, num_answers)
        )

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return self.mlp(fused)
