"""Raw text / images / audio -> the model's forward inputs, through the training pipeline's own pieces.

`Preprocess` is built by `mmt.data.codec.build_codec` for evaluation (no augmentation) and pads with its
`Collator`, so a sample read from a shard and the same sample given as a file or a string reach the model as
identical tensors (tested). The data settings (image mean/std, text length, audio rate...) are those of the run
that trained the weights when they are known.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmt.config.data import DataConfig
from mmt.config.model import MultiModalConfig
from mmt.config.root import Config
from mmt.data.codec import build_codec
from mmt.data.samples import Collator
from mmt.inference.media import InputError, Waveform, load_audio, load_image

_PATH = (str, os.PathLike)
# the forward arguments of each tower (the batch contract of `mmt.data.samples`)
FORWARD_KEYS = {
    "text": ("text_inputs", "text_attention_mask"),
    "image": ("image_features", "image_attention_mask"),
    "audio": ("audio_features", "audio_attention_mask"),
}


def _as_list(x: Any, single: tuple[type, ...]) -> list[Any]:
    if isinstance(x, single):
        return [x]
    if isinstance(x, (list, tuple)):
        return list(x)
    raise InputError(
        f"expected {' or '.join(t.__name__ for t in single)} or a list of them, got {type(x).__name__}"
    )


class Preprocess:
    """Callable like open_clip's ``preprocess`` (one PIL image -> (C, H, W)); `batch` makes forward kwargs."""

    def __init__(self, model_cfg: MultiModalConfig, data_cfg: DataConfig | None = None) -> None:
        self.model_cfg = model_cfg
        self.data_cfg = data_cfg or DataConfig()
        cfg = Config(model=model_cfg, data=self.data_cfg)
        self._decoder, collate = build_codec(cfg, train=False, settings=None)  # type: ignore[arg-type]
        self._spec = collate.spec
        self._collate = {
            m: Collator(dataclasses.replace(self._spec, modalities=(m,))) for m in self._spec.modalities
        }
        self._rng = np.random.default_rng(0)  # evaluation transforms draw nothing; the argument is required

    @property
    def tokenizer(self) -> Any:
        return self._decoder.tokenizer

    def _need(self, m: str) -> None:
        if m not in self._spec.modalities:
            raise InputError(f"got {m} input but the model has no {m} tower (model.{m} is not set)")

    def _collated(self, m: str, values: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        batch, _ = self._collate[m]([{"key": str(i), m: v} for i, v in enumerate(values)])
        assert batch is not None
        return {k: batch[k] for k in FORWARD_KEYS[m] if k in batch}

    # ---- one modality ------------------------------------------------------------------------------------------
    def text(self, texts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """``text_inputs`` (B, L) token ids and ``text_attention_mask``, truncated and padded as in training."""
        self._need("text")
        items = _as_list(texts, (str,))
        ids = [
            torch.tensor(self.tokenizer.encode(t, self._decoder.text_max_len), dtype=torch.long)
            for t in items
        ]
        return self._collated("text", ids)

    def image_tensor(self, image: Image.Image | str | os.PathLike) -> torch.Tensor:
        self._need("image")
        if isinstance(image, _PATH):
            image = load_image(image)
        if not isinstance(image, Image.Image):
            raise InputError(f"expected a PIL image or an image path, got {type(image).__name__}")
        return self._decoder.image(image.convert("RGB") if image.mode != "RGB" else image, self._rng)

    def image(self, images: Any) -> dict[str, torch.Tensor]:
        """``image_features`` (B, C, H, W), normalised with the run's mean / std."""
        items = _as_list(images, (Image.Image, *_PATH))
        return self._collated("image", [self.image_tensor(x) for x in items])

    def audio_tensor(self, audio: Any) -> torch.Tensor:
        """A waveform (numpy at ``model.audio.sample_rate``, or a `Waveform` with its own rate) or a file."""
        self._need("audio")
        if isinstance(audio, _PATH):
            audio = load_audio(audio)
        if isinstance(audio, tuple) and len(audio) == 2:
            wave, sr = audio
        elif isinstance(audio, np.ndarray):
            wave, sr = audio, self.model_cfg.audio.sample_rate
        else:
            raise InputError(
                f"expected a waveform (numpy array), a Waveform or a path, got {type(audio).__name__}"
            )
        wave = np.asarray(wave, dtype=np.float32)
        if wave.ndim == 2:  # (samples, channels) as soundfile returns
            wave = wave.mean(axis=1)
        if wave.ndim != 1 or wave.size == 0:
            raise InputError(f"expected a non-empty mono waveform, got shape {tuple(wave.shape)}")
        return self._decoder.audio.from_wave(wave, int(sr), self._rng)

    def audio(self, audio: Any) -> dict[str, torch.Tensor]:
        """``audio_features`` and ``audio_attention_mask``, cut and padded to ``model.audio.max_seconds``."""
        items = [audio] if _is_single_audio(audio) else _as_list(audio, (np.ndarray, Waveform, *_PATH))
        return self._collated("audio", [self.audio_tensor(x) for x in items])

    def __call__(self, image: Image.Image | str | os.PathLike) -> torch.Tensor:
        """One image -> (C, H, W), as open_clip's ``preprocess``."""
        return self.image_tensor(image)

    # ---- forward kwargs ----------------------------------------------------------------------------------------
    def batch(self, text: Any = None, image: Any = None, audio: Any = None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if text is not None:
            out.update(self.text(text))
        if image is not None:
            out.update(self.image(image))
        if audio is not None:
            out.update(self.audio(audio))
        return out


def _is_single_audio(x: Any) -> bool:
    return isinstance(x, (np.ndarray, Waveform, *_PATH)) or (
        isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], np.ndarray) and isinstance(x[1], int)
    )


def is_raw(modality: str, x: Any) -> bool:
    """Whether a forward argument is raw media (needs `Preprocess`) rather than prepared tensors."""
    if x is None or isinstance(x, torch.Tensor):
        return False
    if isinstance(x, (list, tuple)) and x and all(isinstance(v, torch.Tensor) for v in x):
        return False
    return True
