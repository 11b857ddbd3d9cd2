"""One exportable module per tower: inputs as the data pipeline makes them -> the L2-normalised embedding.

Each wraps the tower's encoder, pooling and contrastive projection of a `MultiModalModel` (shared weights, no
copy), with tensor-only inputs so ONNX, TorchScript and torch.export can trace it:

* text: ``text_inputs`` (B, L) int64, ``text_attention_mask`` (B, L) bool;
* image: ``image_features`` (B, C, H, W) float32, normalised;
* audio: ``audio_features`` (B, T) float32 waveform, ``audio_attention_mask`` (B, T) bool.
"""

from __future__ import annotations

import torch
from torch import nn

from mmt.config.model import MultiModalConfig
from mmt.model.multimodal import INPUT_KEYS, MultiModalModel

TOWERS = ("text", "image", "audio")


class TowerEncoder(nn.Module):
    def __init__(self, model: MultiModalModel, modality: str) -> None:
        super().__init__()
        if model.contrastive is None:
            raise ValueError("export needs a model with a contrastive head (heads.contrastive: true)")
        if modality not in model.encoders:
            raise ValueError(f"the model has no {modality} tower (it has {', '.join(model.modalities)})")
        self.modality = modality
        self.encoder = model.encoders[modality]
        self.pool = model.pools[modality]
        self.proj = model.contrastive.proj[modality]

    def input_names(self) -> list[str]:
        feat, mask = INPUT_KEYS[self.modality]
        return [feat] if self.modality == "image" else [feat, mask]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        feats, tok_mask = self.encoder(x, mask)
        return torch.nn.functional.normalize(self.proj(self.pool(feats, tok_mask)), dim=-1)


def example_inputs(cfg: MultiModalConfig, modality: str, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Inputs of the right dtypes and shapes for tracing; text rows of different lengths (padding masked)."""
    if modality == "text":
        length = min(12, cfg.text.max_len)
        ids = torch.randint(3, 200, (batch, length))
        mask = torch.ones(batch, length, dtype=torch.bool)
        mask[0, length // 2 :] = False
        return ids, mask
    if modality == "image":
        c, s = cfg.image.channels, cfg.image.image_size
        return (torch.randn(batch, c, s, s),)
    n = int(round(cfg.audio.max_seconds * cfg.audio.sample_rate))
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[0, n // 2 :] = False
    return torch.randn(batch, n) * 0.1, mask
