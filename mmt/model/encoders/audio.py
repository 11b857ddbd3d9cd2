"""Audio encoder: waveform -> log-mel (torch ops) -> patches of frames -> tower.

``input=raw`` takes (B, T) waveforms with a (B, T) sample mask, ``spectrogram`` takes (B, frames, n_mels)
with a (B, frames) mask, ``features`` takes (B, N, feature_dim). A token is real if any frame in it is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmt.audio.melspec import LogMelSpectrogram
from mmt.config.model import AudioEncoderConfig, ModelConfig
from mmt.model.block import Tower


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig, spec: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.melspec = (
            LogMelSpectrogram(cfg.sample_rate, cfg.n_fft, cfg.hop_length, cfg.n_mels)
            if cfg.input == "raw"
            else None
        )
        if cfg.input == "features":
            self.proj = nn.Linear(cfg.feature_dim, spec.dim)
        else:
            self.proj = nn.Linear(cfg.patch_frames * cfg.n_mels, spec.dim)
        self.tower = Tower(spec, self.num_tokens())

    def max_frames(self) -> int:
        return int(self.cfg.max_seconds * self.cfg.sample_rate) // self.cfg.hop_length + 1

    def num_tokens(self) -> int:
        if self.cfg.input == "features":
            return self.cfg.max_tokens
        return math.ceil(self.max_frames() / self.cfg.patch_frames)

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if cfg.input == "features":
            x = self.proj(inputs)
            if mask is None:
                mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            return self.tower(x, mask.bool()), mask.bool()
        if cfg.input == "raw":
            if inputs.dim() != 2:
                raise ValueError(
                    f"audio_features must be (B, T) waveforms for input=raw, got {tuple(inputs.shape)}"
                )
            if mask is not None:
                # Zero the padding first: STFT windows at the end of a clip overlap it.
                inputs = inputs * mask.to(inputs.dtype)
            frames = self.melspec(inputs)
            if mask is not None:
                # Frame f is centred on sample f * hop: real while that sample is.
                n_real = mask.long().sum(-1)
                idx = torch.arange(frames.shape[1], device=inputs.device)
                mask = idx[None, :] * cfg.hop_length < n_real[:, None]
        else:
            frames = inputs
        if frames.shape[-1] != cfg.n_mels:
            raise ValueError(
                f"audio spectrogram has {frames.shape[-1]} mel bands, the config says n_mels={cfg.n_mels}"
            )
        b, f, m = frames.shape
        p = cfg.patch_frames
        pad = (-f) % p
        frames = F.pad(frames, (0, 0, 0, pad))
        # log-mel is computed in fp32; follow the weights' dtype (bf16 / fp16 training keeps weights in half),
        # read from the tower: a dynamically quantized proj (int8 export) has no weight tensor
        dtype = next(self.tower.parameters()).dtype
        x = self.proj(frames.reshape(b, (f + pad) // p, p * m).to(dtype))
        if mask is None:
            tok_mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        else:
            tok_mask = F.pad(mask.bool(), (0, pad), value=False).view(b, -1, p).any(-1)
        return self.tower(x, tok_mask), tok_mask
