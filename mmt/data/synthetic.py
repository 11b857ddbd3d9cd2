"""Small synthetic tri-modal shards for tests and benchmarks (written with the real shard writer)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from mmt.data import media
from mmt.data.build.builder import write_samples
from mmt.data.build.process import Processed, assemble_sample

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")


def synthetic_sample(
    index: int,
    seed: int = 0,
    image_size: int = 32,
    audio_seconds: float = 0.25,
    sample_rate: int = 8000,
    key_prefix: str = "sample",
) -> dict[str, bytes]:
    """Sample ``index``: a noisy image, a caption naming its class, a tone, a VQA question; deterministic."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(len(COLOURS)))
    pixels = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    image = media.encode_image(Image.fromarray(pixels), "jpg", 90)
    t = np.arange(int(audio_seconds * sample_rate)) / sample_rate
    wav = 0.5 * np.sin(2 * np.pi * (300 + 200 * label) * t + rng.uniform(0, 6.28)).astype(np.float32)
    return assemble_sample(
        f"{key_prefix}{index:06d}",
        image=("jpg", image),
        audio=("wav", media.encode_audio(wav, sample_rate, "wav")),
        captions=[f"a {COLOURS[label]} square number {index}", f"{COLOURS[label]} {index}"],
        question="what colour is it?",
        answers=[COLOURS[label]] * 3,
        meta={"label": label},
    )


def synthetic_processed(n: int, seed: int = 0, **kw: Any) -> Iterator[Processed]:
    for i in range(n):
        sample = synthetic_sample(i, seed, **kw)
        yield Processed(sample["__key__"], f"synthetic[{i}]", sample, None, ("image", "text", "audio", "vqa"))


def write_synthetic_shards(
    out: str, n: int, per_shard: int, seed: int = 0, endpoint_url: str = "", **kw: Any
) -> dict[str, Any]:
    """``n`` samples in shards of ``per_shard`` under ``out`` (with index sidecars, manifest and answers.json)."""
    return write_samples(
        synthetic_processed(n, seed, **kw),
        out,
        max_samples_per_shard=per_shard,
        endpoint_url=endpoint_url,
        options={"synthetic": n, "seed": seed},
        vocab=list(COLOURS),
    )
