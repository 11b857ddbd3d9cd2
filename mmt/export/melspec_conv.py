"""Log-mel as real-valued ops (a strided conv with windowed DFT kernels) for ONNX, which has no complex STFT.

Numerically the same transform as `mmt.audio.LogMelSpectrogram` (``torch.stft``, centred, reflect padding, Hann
window, power, mel filterbank, log10) up to float summation order; used only in exported audio towers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmt.audio.melspec import LogMelSpectrogram


class ConvLogMel(nn.Module):
    def __init__(self, ref: LogMelSpectrogram) -> None:
        super().__init__()
        n_fft, self.hop_length = ref.n_fft, ref.hop_length
        n = torch.arange(n_fft, dtype=torch.float64)
        k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
        angle = 2 * math.pi * k[:, None] * n[None, :] / n_fft
        window = ref.window.double()[None, :]
        kernels = torch.cat([torch.cos(angle) * window, -torch.sin(angle) * window])  # (2F, n_fft)
        self.register_buffer("kernels", kernels.float()[:, None, :], persistent=False)
        self.register_buffer("fbank", ref.fbank.clone(), persistent=False)
        self.n_fft, self.n_freq = n_fft, n_fft // 2 + 1

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = F.pad(wav.float()[:, None, :], (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        spec = F.conv1d(x, self.kernels, stride=self.hop_length)  # (B, 2F, frames)
        re, im = spec[:, : self.n_freq], spec[:, self.n_freq :]
        power = (re * re + im * im).transpose(1, 2)
        return torch.log(power @ self.fbank + 1e-6) / math.log(10.0)
