"""``mmt shards demo OUT``: the embedded tri-modal demo dataset, built from data shipped inside scikit-learn.

Every sample has all fields, so one layout serves all three tasks:

* image: a real 8x8 handwritten digit (``sklearn.datasets.load_digits``) upscaled to 32x32 RGB (``KEY.jpg``);
* text: captions from varied templates naming the digit (``KEY.txt`` = the first; ``KEY.json`` "captions");
* audio: a synthetic 0.5 s, 8000 Hz tone pair whose pitch encodes the digit, with random phase, amplitude,
  onset and noise (``KEY.wav``), so the audio tower has a learnable signal too;
* VQA: a question ("what digit is this?", "is this digit even?", ...) with ten annotator answers in
  ``KEY.json``, scored against ``answers.json`` (shared by both splits).

Output: ``OUT/train/shard-*.tar`` and ``OUT/val/shard-*.tar`` (with index sidecars and manifests),
``OUT/answers.json`` and ``OUT/demo.json`` naming the URLs to put in ``data.train_urls`` / ``data.val_urls``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmt.atomic import atomic_write_text
from mmt.data import media, storage
from mmt.data.build.builder import write_samples
from mmt.data.build.process import Processed, assemble_sample
from mmt.data.schema import ANSWERS_NAME

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten digit {word}",
    "the number {d}",
    "a photo of the digit {word}",
    "{word}, written by hand",
    "an image showing a {d}",
    "a scanned {word}",
    "handwritten {d} ({word})",
    "the digit {word} in white ink",
    "a small picture of a {word}",
    "a {d} drawn with a pen",
)
QUESTIONS = (
    ("what digit is this?", lambda d: str(d)),
    ("what number is shown?", lambda d: str(d)),
    ("is this digit even?", lambda d: "yes" if d % 2 == 0 else "no"),
    ("is this digit greater than four?", lambda d: "yes" if d > 4 else "no"),
)
ANSWER_VOCAB = [str(d) for d in range(10)] + ["yes", "no"]
SAMPLE_RATE = 8000
DURATION_S = 0.5
IMAGE_SIZE = 32


def digit_tone(digit: int, rng: np.random.Generator) -> np.ndarray:
    """Two partials at digit-specific pitches (300 + 250 d Hz and 1.25x that), random phase/amplitude/onset."""
    n = int(SAMPLE_RATE * DURATION_S)
    t = np.arange(n) / SAMPLE_RATE
    f0 = 300.0 + 250.0 * digit
    wav = np.zeros(n)
    for f, a in ((f0, rng.uniform(0.3, 0.6)), (f0 * 1.25, rng.uniform(0.15, 0.35))):
        wav += a * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    onset = int(rng.uniform(0, 0.1) * SAMPLE_RATE)
    envelope = np.clip((np.arange(n) - onset) / (0.02 * SAMPLE_RATE), 0, 1)
    envelope *= np.exp(-t * rng.uniform(0.5, 2.0))
    wav = wav * envelope + rng.normal(0, 0.03, n)
    return (0.9 * wav / max(1.0, np.abs(wav).max())).astype(np.float32)


def digit_image(pixels: np.ndarray) -> Image.Image:
    """8x8 values in [0, 16] -> 32x32 RGB, white ink on black, bilinear upscale."""
    gray = Image.fromarray((pixels * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
    return gray.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR).convert("RGB")


def demo_samples(
    indices: np.ndarray, images: np.ndarray, targets: np.ndarray, seed: int
) -> Iterator[Processed]:
    for idx in indices:
        idx = int(idx)
        digit = int(targets[idx])
        rng = np.random.default_rng([seed, idx])
        key = f"digit{idx:05d}"
        order = rng.permutation(len(TEMPLATES))[:4]
        captions = [TEMPLATES[i].format(word=WORDS[digit], d=digit) for i in order]
        question, answer_of = QUESTIONS[int(rng.integers(len(QUESTIONS)))]
        answers = [answer_of(digit)] * 10
        if rng.random() < 0.3:  # one annotator disagrees now and then: exercises the soft scores
            answers[-1] = ANSWER_VOCAB[int(rng.integers(len(ANSWER_VOCAB)))]
        sample = assemble_sample(
            key,
            image=("jpg", media.encode_image(digit_image(images[idx]), "jpg", 95)),
            audio=("wav", media.encode_audio(digit_tone(digit, rng), SAMPLE_RATE, "wav")),
            captions=captions,
            question=question,
            answers=answers,
            meta={"label": digit, "source": "sklearn.datasets.load_digits", "index": idx},
        )
        yield Processed(
            key, f"load_digits[{idx}]", sample, None, ("image", "text", "audio", "vqa"), tuple(answers)
        )


def build_demo(
    out: str,
    *,
    val_fraction: float = 0.1,
    max_samples_per_shard: int = 256,
    seed: int = 0,
    endpoint_url: str = "",
) -> dict[str, Any]:
    """Write the demo shards under ``out``; returns the ``demo.json`` content (URLs and counts)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, targets = digits.images, digits.target
    order = np.random.default_rng(seed).permutation(len(targets))
    n_val = int(round(len(order) * val_fraction))
    splits = {"train": np.sort(order[n_val:]), "val": np.sort(order[:n_val])}
    info: dict[str, Any] = {"answer_vocab": storage.join(out, ANSWERS_NAME), "num_answers": len(ANSWER_VOCAB)}
    for split, indices in splits.items():
        manifest = write_samples(
            demo_samples(indices, images, targets, seed),
            storage.join(out, split),
            max_samples_per_shard=max_samples_per_shard,
            endpoint_url=endpoint_url,
            options={"demo": "sklearn digits", "split": split, "seed": seed, "val_fraction": val_fraction},
            task="auto",
            vocab=ANSWER_VOCAB,
        )
        info[f"{split}_urls"] = manifest["urls"]
        info[f"{split}_samples"] = manifest["num_samples"]
    payload = {"answers": ANSWER_VOCAB}
    storage.write_bytes(json.dumps(payload, indent=1).encode(), storage.join(out, ANSWERS_NAME), endpoint_url)
    storage.write_bytes(json.dumps(info, indent=1).encode(), storage.join(out, "demo.json"), endpoint_url)
    return info


def build_demo_annotations(out: str, *, val_fraction: float = 0.1, seed: int = 0) -> dict[str, Any]:
    """The same demo as `build_demo` in the annotation layout (local folder): ``OUT/media/KEY.jpg|wav``,
    ``OUT/train.jsonl`` and ``OUT/val.jsonl`` (fields ``id``, ``image``, ``audio``, ``captions``, ``question``,
    ``answers``, ``label``: what ``mmt shards build`` reads), ``OUT/answers.json``, ``OUT/demo.json``.
    Train with ``data.format=annotations data.train_urls=OUT/train.jsonl data.val_urls=OUT/val.jsonl``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, targets = digits.images, digits.target
    order = np.random.default_rng(seed).permutation(len(targets))
    n_val = int(round(len(order) * val_fraction))
    splits = {"train": np.sort(order[n_val:]), "val": np.sort(order[:n_val])}
    root = Path(out)
    (root / "media").mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {
        "format": "annotations",
        "answer_vocab": str(root / ANSWERS_NAME),
        "num_answers": len(ANSWER_VOCAB),
    }
    for split, indices in splits.items():
        lines = []
        for p in demo_samples(indices, images, targets, seed):
            s = p.sample or {}
            meta = json.loads(s["json"])
            (root / "media" / f"{p.key}.jpg").write_bytes(s["jpg"])
            (root / "media" / f"{p.key}.wav").write_bytes(s["wav"])
            record = {
                "id": p.key,
                "image": f"media/{p.key}.jpg",
                "audio": f"media/{p.key}.wav",
                "captions": meta["captions"],
                "question": meta["question"],
                "answers": meta["answers"],
                "label": meta["label"],
                "source": meta["source"],
                "index": meta["index"],
            }
            lines.append(json.dumps(record, sort_keys=True))
        atomic_write_text(root / f"{split}.jsonl", "\n".join(lines) + "\n")
        info[f"{split}_urls"] = str(root / f"{split}.jsonl")
        info[f"{split}_samples"] = len(lines)
    atomic_write_text(root / ANSWERS_NAME, json.dumps({"answers": ANSWER_VOCAB}, indent=1))
    atomic_write_text(root / "demo.json", json.dumps(info, indent=1))
    return info
