"""Tiny model configs and batches shared by the model tests."""

from __future__ import annotations

import copy
import dataclasses
import functools

import torch

from mmt.config import load_config
from mmt.config.model import AttentionConfig, DecoderConfig, MultiModalConfig

# Window, stride and chunk below the 16 image / audio tokens, so sparse, strided and chunked attention take
# their multi-block paths on these short sequences.
SMALL_BLOCKS = AttentionConfig(window=4, num_global=1, stride=3, chunk_size=5)


@functools.cache
def _shipped_tiny() -> MultiModalConfig:
    return load_config("tiny_tri", schema=MultiModalConfig)


def tiny_config(**shared) -> MultiModalConfig:
    """The shipped tiny model (``configs/model/tiny_tri.yaml``, the one definition of "tiny") with every part
    switched on: a captioning decoder, a 5-answer VQA head, attention blocks smaller than the sequences.
    ``shared`` replaces top-level fields (``positional=``, ``fusion=``, ``attention=``...)."""
    cfg = copy.deepcopy(_shipped_tiny())
    cfg.name, cfg.attention = "test", SMALL_BLOCKS
    cfg.decoder = DecoderConfig(depth=1, max_len=24)
    cfg.heads.vqa_answers = 5
    return dataclasses.replace(cfg, **shared)


def tiny_batch(b: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """For `tiny_config`: padded text (rows of 20, 13, 7 real tokens), 32x32 images, audio with 8000, 6000, 3600
    real samples (1 s at 8 kHz: 16, 12, 8 tokens)."""
    g = torch.Generator().manual_seed(seed)
    text_len = [20, 13, 7, 11][:b]
    audio_len = [8000, 6000, 3600, 4800][:b]
    text = torch.randint(3, 259, (b, 20), generator=g)
    text_mask = torch.arange(20)[None] < torch.tensor(text_len)[:, None]
    audio = torch.randn(b, 8000, generator=g)
    audio_mask = torch.arange(8000)[None] < torch.tensor(audio_len)[:, None]
    return dict(
        text_inputs=torch.where(text_mask, text, 0),
        text_attention_mask=text_mask,
        image_features=torch.randn(b, 3, 32, 32, generator=g),
        audio_features=audio * audio_mask,
        audio_attention_mask=audio_mask,
        decoder_input_ids=torch.where(text_mask, text, 0),
        decoder_attention_mask=text_mask,
    )


def scramble_padding(batch: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """The same batch with different content at every padded position."""
    g = torch.Generator().manual_seed(seed)
    out = dict(batch)
    tm = batch["text_attention_mask"]
    noise_ids = torch.randint(3, 259, tm.shape, generator=g)
    out["text_inputs"] = torch.where(tm, batch["text_inputs"], noise_ids)
    out["decoder_input_ids"] = torch.where(
        batch["decoder_attention_mask"], batch["decoder_input_ids"], noise_ids
    )
    am = batch["audio_attention_mask"]
    out["audio_features"] = torch.where(am, batch["audio_features"], 5 * torch.randn(am.shape, generator=g))
    return out
