"""Zero-shot digit accuracy on the demo's held-out split for any encoder (eager, exported, int8).

``encode(modality, raw_inputs) -> (N, E)`` embeddings is all it needs, so the eager model, an `mmt export`
folder and its int8 variant are measured by the same code on the same files. Prompts: the demo's own caption
templates (the ones `configs/train/demo.yaml` lists for training's evaluation).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import soundfile as sf
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from mmt.data import media
from mmt.data.build.demo import TEMPLATES, WORDS
from mmt.data.shards import iter_tar_samples
from mmt.data.storage import expand
from mmt.inference.media import Waveform
from mmt.inference.zero_shot import fill, zero_shot_accuracy

DIGIT_TEMPLATES = [t.replace("{word}", "{c}").replace("{d}", "{i}") for t in TEMPLATES]
Encode = Callable[[str, list[Any]], torch.Tensor]


def held_out_digits(val_urls: str) -> tuple[list[Image.Image], list[Waveform], torch.Tensor]:
    """Images, waveforms and labels of the demo's validation shards, decoded as the loader decodes them."""
    images, waves, labels = [], [], []
    for url in expand(val_urls):
        with open(url, "rb") as f:
            for s in iter_tar_samples(f, url):
                images.append(media.decode_image(s["jpg"]))
                wave, sr = sf.read(io.BytesIO(s["wav"]), dtype="float32")
                waves.append(Waveform(wave, int(sr)))
                labels.append(int(json.loads(s["json"])["label"]))
    return images, waves, torch.tensor(labels)


def digit_zero_shot(
    encode: Encode, data: tuple[list[Image.Image], list[Waveform], torch.Tensor], batch: int = 64
) -> dict[str, float]:
    """Top-1 zero-shot accuracy per modality (image, audio) with ``encode``."""
    images, waves, labels = data
    prompts = [fill(t, c, i) for i, c in enumerate(WORDS) for t in DIGIT_TEMPLATES]
    text = torch.cat([encode("text", prompts[s : s + batch]) for s in range(0, len(prompts), batch)]).float()
    emb = F.normalize(text.view(len(WORDS), len(DIGIT_TEMPLATES), -1), dim=-1).mean(1)
    classifier = F.normalize(emb, dim=-1).T
    out = {}
    for m, items in (("image", images), ("audio", waves)):
        x = torch.cat([encode(m, items[s : s + batch]) for s in range(0, len(items), batch)])
        out[m] = zero_shot_accuracy(x, labels, classifier, ks=(1,))[1]
    return out


def val_urls_of(run_dir: str | Path) -> str:
    """The held-out shards a demo run evaluated on (from its saved config)."""
    return yaml.safe_load((Path(run_dir) / "config.yaml").read_text())["data"]["val_urls"]
