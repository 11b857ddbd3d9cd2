"""Per-sample image and audio transforms with Pillow, numpy and torch ops (no torchvision / torchaudio).

Every random choice draws from a generator the caller seeds from (seed, epoch, sample position), so the same
sample in the same epoch gets the same augmentation whichever rank or worker decodes it: resumed runs see
bit-identical batches.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageEnhance

from mmt.audio import LogMelSpectrogram
from mmt.config.data import AudioDataConfig, ImageDataConfig
from mmt.data import media


class ImageTransform:
    """PIL RGB image -> normalised (C, size, size) float tensor; random-resized-crop / flip / jitter in training."""

    def __init__(self, size: int, cfg: ImageDataConfig, train: bool) -> None:
        self.size, self.cfg, self.train = size, cfg, train
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(cfg.std, dtype=torch.float32).view(-1, 1, 1)

    def _crop_box(self, w: int, h: int, rng: np.random.Generator) -> tuple[float, float, float, float]:
        """torchvision's RandomResizedCrop box: area in [scale_min, 1], log-uniform aspect ratio."""
        area = w * h
        log_r = math.log(self.cfg.crop_ratio_max)
        for _ in range(10):
            target = area * rng.uniform(self.cfg.crop_scale_min, 1.0)
            ratio = math.exp(rng.uniform(-log_r, log_r))
            cw, ch = math.sqrt(target * ratio), math.sqrt(target / ratio)
            if cw <= w and ch <= h:
                x, y = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
                return x, y, x + cw, y + ch
        side = min(w, h)
        return (w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        w, h = img.size
        if self.train and (self.cfg.crop_scale_min < 1.0 or self.cfg.crop_ratio_max > 1.0):
            box = self._crop_box(w, h, rng)
        else:  # resize the shorter side, centre crop
            side = min(w, h)
            box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        img = img.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        if self.train and self.cfg.hflip > 0 and rng.random() < self.cfg.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.train and self.cfg.color_jitter > 0:
            j = self.cfg.color_jitter
            img = ImageEnhance.Brightness(img).enhance(rng.uniform(1 - j, 1 + j))
            img = ImageEnhance.Contrast(img).enhance(rng.uniform(1 - j, 1 + j))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        if x.shape[0] != self.mean.shape[0]:
            raise ValueError(f"image has {x.shape[0]} channels, data.image.mean has {self.mean.shape[0]}")
        return (x - self.mean) / self.std


class AudioTransform:
    """Encoded audio -> mono float waveform at the model's rate, at most ``max_seconds`` long.

    With ``spectrogram=True`` it returns ``(frames, n_mels)`` log-mel features instead (for
    ``model.audio.input == "spectrogram"``), computed with `mmt.audio.LogMelSpectrogram`.
    """

    def __init__(
        self,
        sample_rate: int,
        max_seconds: float,
        cfg: AudioDataConfig,
        train: bool,
        spectrogram: tuple[int, int, int] | None = None,
    ) -> None:
        self.sample_rate, self.cfg, self.train = sample_rate, cfg, train
        self.max_samples = max(1, int(round(max_seconds * sample_rate)))
        self.mel = None
        if spectrogram is not None:
            n_fft, hop, n_mels = spectrogram
            self.mel = LogMelSpectrogram(sample_rate, n_fft, hop, n_mels)

    def __call__(self, data: bytes, rng: np.random.Generator) -> torch.Tensor:
        wav, sr = media.decode_audio(data)
        return self.from_wave(wav, sr, rng)

    def from_wave(self, wav: np.ndarray, sr: int, rng: np.random.Generator) -> torch.Tensor:
        """The same transform from an already decoded mono waveform (the inference path's raw input)."""
        wav = media.resample(wav, sr, self.sample_rate)
        if wav.size > self.max_samples:
            start = 0
            if self.train and self.cfg.random_crop:
                start = int(rng.integers(0, wav.size - self.max_samples + 1))
            wav = wav[start : start + self.max_samples]
        if self.train and self.cfg.gain_db > 0:
            wav = wav * np.float32(10 ** (rng.uniform(-self.cfg.gain_db, self.cfg.gain_db) / 20))
        x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
        if self.mel is not None:
            with torch.no_grad():
                return self.mel(x[None])[0]
        return x
