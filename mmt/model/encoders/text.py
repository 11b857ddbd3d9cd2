"""Text encoder: token embedding (or a projection of precomputed features) + a transformer tower."""

from __future__ import annotations

import torch
from torch import nn

from mmt.config.model import ModelConfig, TextEncoderConfig
from mmt.model.block import Tower
from mmt.text import build_tokenizer


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig, spec: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.input == "raw":
            vocab = build_tokenizer(cfg.tokenizer).vocab_size
            if vocab > cfg.vocab_size:
                raise ValueError(
                    f"model.text.vocab_size={cfg.vocab_size} is smaller than the vocabulary of tokenizer "
                    f"{cfg.tokenizer!r} ({vocab} ids)"
                )
        self.token_embedding = nn.Embedding(cfg.vocab_size, spec.dim) if cfg.input == "raw" else None
        if self.token_embedding is not None:
            nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.proj = nn.Linear(cfg.feature_dim, spec.dim) if cfg.input == "features" else None
        self.tower = Tower(spec, cfg.max_len)

    def num_tokens(self) -> int:
        return self.cfg.max_len

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.token_embedding is not None:
            if inputs.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"text_inputs must be token ids (int), got {inputs.dtype}")
            x = self.token_embedding(inputs)
        else:
            x = self.proj(inputs)
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return self.tower(x, mask.bool()), mask.bool()
