"""Reading raw media for inference: the same decoders the shard loader uses, with one-line errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from mmt.data import media


class InputError(ValueError):
    """A raw input that cannot be used (a file that does not decode, a wrong type): one line naming it."""


class Waveform(NamedTuple):
    """A decoded mono waveform and its sample rate (resampled to the model's rate when preprocessed)."""

    wave: np.ndarray
    sample_rate: int


def _read(path: str | os.PathLike, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such {what} file")
    return p.read_bytes()


def load_image(path: str | os.PathLike) -> Image.Image:
    """An RGB PIL image decoded exactly as the shard loader decodes a ``.jpg`` / ``.png`` member."""
    data = _read(path, "image")
    try:
        return media.decode_image(data)
    except Exception as e:  # PIL raises several types for broken files
        raise InputError(f"{path}: cannot decode as an image ({type(e).__name__}: {e})") from None


def load_audio(path: str | os.PathLike) -> Waveform:
    """The mono float32 waveform of a wav / flac / ogg file and its rate, decoded as the loader decodes audio."""
    data = _read(path, "audio")
    try:
        wave, sr = media.decode_audio(data)
    except Exception as e:  # soundfile raises its own error types
        raise InputError(f"{path}: cannot decode as audio ({type(e).__name__}: {e})") from None
    return Waveform(wave, sr)
