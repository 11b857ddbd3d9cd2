"""Tiny model configs and batches shared by the model tests."""

from __future__ import annotations

import torch

from mmt.config.model import (
    AttentionConfig,
    AudioEncoderConfig,
    DecoderConfig,
    FusionConfig,
    HeadsConfig,
    ImageEncoderConfig,
    MultiModalConfig,
    TextEncoderConfig,
)


def tiny_config(**shared) -> MultiModalConfig:
    """Every part switched on (3 towers, VQA head, decoder), as small as it gets."""
    attention = shared.pop("attention", AttentionConfig(window=4, num_global=1, stride=3, chunk_size=5))
    fusion = shared.pop("fusion", FusionConfig(depth=1))
    base = dict(dim=32, depth=1, num_heads=4, dropout=0.0)
    base.update(shared)
    return MultiModalConfig(
        name="test",
        attention=attention,
        text=TextEncoderConfig(max_len=24),
        image=ImageEncoderConfig(image_size=16, patch_size=4),
        audio=AudioEncoderConfig(
            sample_rate=4000, n_fft=128, hop_length=64, n_mels=16, patch_frames=2, max_seconds=0.5
        ),
        fusion=fusion,
        decoder=DecoderConfig(depth=1, max_len=24),
        heads=HeadsConfig(embed_dim=16, vqa_answers=5),
        **base,
    )


def tiny_batch(b: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Padded text (rows of 20, 13, 7 real tokens), images, audio with 2000, 1500, 900 real samples."""
    g = torch.Generator().manual_seed(seed)
    text_len = [20, 13, 7, 11][:b]
    audio_len = [2000, 1500, 900, 1200][:b]
    text = torch.randint(3, 259, (b, 20), generator=g)
    text_mask = torch.arange(20)[None] < torch.tensor(text_len)[:, None]
    audio = torch.randn(b, 2000, generator=g)
    audio_mask = torch.arange(2000)[None] < torch.tensor(audio_len)[:, None]
    return dict(
        text_inputs=torch.where(text_mask, text, 0),
        text_attention_mask=text_mask,
        image_features=torch.randn(b, 3, 16, 16, generator=g),
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
