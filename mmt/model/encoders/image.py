"""Image encoder: ViT patch embedding of pixels (or a projection of precomputed features) + a tower."""

from __future__ import annotations

import torch
from torch import nn

from mmt.config.model import ImageEncoderConfig, ModelConfig
from mmt.model.block import Tower


class ImageEncoder(nn.Module):
    def __init__(self, cfg: ImageEncoderConfig, spec: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.input == "raw":
            if cfg.image_size % cfg.patch_size:
                raise ValueError(
                    f"image_size={cfg.image_size} is not a multiple of patch_size={cfg.patch_size}"
                )
            self.patch = nn.Conv2d(cfg.channels, spec.dim, cfg.patch_size, stride=cfg.patch_size)
            self.proj = None
        else:
            self.patch = None
            self.proj = nn.Linear(cfg.feature_dim, spec.dim)
        self.tower = Tower(spec, self.num_tokens())

    def num_tokens(self) -> int:
        if self.cfg.input == "raw":
            return (self.cfg.image_size // self.cfg.patch_size) ** 2
        return self.cfg.max_tokens

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.patch is not None:
            if inputs.dim() != 4:
                raise ValueError(
                    f"image_features must be (B, C, H, W) pixels for input=raw, got {tuple(inputs.shape)}"
                )
            x = self.patch(inputs).flatten(2).transpose(1, 2)
            # Pixels have no padding; a per-sample mask (B,) or (B, N) marks absent images.
            if mask is not None and mask.dim() == 1:
                mask = mask[:, None].expand(-1, x.shape[1])
        else:
            x = self.proj(inputs)
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if mask.shape != x.shape[:2]:
            raise ValueError(
                f"image_attention_mask has shape {tuple(mask.shape)}, expected {tuple(x.shape[:2])}"
            )
        return self.tower(x, mask.bool()), mask.bool()
