"""Log-mel spectrogram with plain torch ops (``torch.stft`` + a Slaney-style triangular mel filterbank).

Used by the audio encoder when it is fed raw waveforms, and by the data pipeline when it precomputes features.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def _mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(
    n_fft: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None
) -> torch.Tensor:
    """(n_fft // 2 + 1, n_mels) triangular filters on the HTK mel scale, area-normalised."""
    f_max = f_max if f_max is not None else sample_rate / 2
    n_freqs = n_fft // 2 + 1
    freqs = torch.linspace(0, sample_rate / 2, n_freqs, dtype=torch.float64)
    mels = torch.linspace(
        _hz_to_mel(torch.tensor(f_min)), _hz_to_mel(torch.tensor(f_max)), n_mels + 2, dtype=torch.float64
    )
    hz = _mel_to_hz(mels)
    lower, center, upper = hz[:-2], hz[1:-1], hz[2:]
    f = freqs[:, None]
    up = (f - lower) / (center - lower)
    down = (upper - f) / (upper - center)
    fb = torch.clamp(torch.minimum(up, down), min=0.0)
    fb = fb * (2.0 / (upper - lower))[None, :]
    return fb.float()


class LogMelSpectrogram(nn.Module):
    """(B, T) waveform -> (B, frames, n_mels) log-mel features; the frame count is ``T // hop_length + 1``."""

    def __init__(
        self, sample_rate: int = 16000, n_fft: int = 400, hop_length: int = 160, n_mels: int = 64
    ) -> None:
        super().__init__()
        self.n_fft, self.hop_length, self.n_mels = n_fft, hop_length, n_mels
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("fbank", mel_filterbank(n_fft, n_mels, sample_rate), persistent=False)

    def num_frames(self, num_samples: int) -> int:
        return num_samples // self.hop_length + 1

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        if wav.dim() == 1:
            wav = wav[None]
        spec = torch.stft(
            wav.float(), self.n_fft, self.hop_length, window=self.window, center=True, return_complex=True
        )
        power = spec.abs().pow(2).transpose(1, 2)  # (B, frames, freqs)
        mel = power @ self.fbank
        return torch.log(mel + 1e-6) / math.log(10.0)
