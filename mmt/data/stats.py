"""``mmt shards stats URL``: what is in a set of shards -- counts, sizes, modality coverage, histograms.

Reads the shards with webdataset's tar iterator (local or any fsspec URL); only image headers are parsed
(Pillow reads the size without decoding pixels) and only audio headers (soundfile ``info``).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from typing import Any

import soundfile as sf
from PIL import Image

from mmt.data import storage
from mmt.data.schema import AUDIO_EXTS, IMAGE_EXTS, TEXT_EXTS, first_of
from mmt.data.shards import iter_tar_samples

CAPTION_BINS = (5, 10, 20, 40, 80)  # words: 0-4, 5-9, ..., >=80
IMAGE_BINS = (32, 64, 128, 256, 512, 1024)  # longer side in pixels: <=32, 33-64, ..., >1024


def caption_bin(words: int) -> str:
    lower = 0
    for edge in CAPTION_BINS:
        if words < edge:
            return f"{lower}-{edge - 1}"
        lower = edge
    return f">={CAPTION_BINS[-1]}"


def image_bin(side: int) -> str:
    lower = 0
    for edge in IMAGE_BINS:
        if side <= edge:
            return f"<={edge}px" if lower == 0 else f"{lower}-{edge}px"
        lower = edge + 1
    return f">{IMAGE_BINS[-1]}px"


def _caption(sample: dict[str, Any]) -> str | None:
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
            if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
                return meta["caption"]
        except ValueError:
            pass
    found = first_of(sample, TEXT_EXTS)
    return found[1].decode("utf-8", "replace") if found else None


def shard_stats(urls: list[str], endpoint_url: str = "", max_samples: int = 0) -> dict[str, Any]:
    totals: Counter = Counter()
    coverage: Counter = Counter()
    exts: Counter = Counter()
    captions: Counter = Counter()
    images: Counter = Counter()
    audio_seconds: list[float] = []
    errors: list[str] = []
    for url in urls:
        try:
            totals["bytes"] += storage.size(url, endpoint_url)
            with storage.open_read(url, endpoint_url) as stream:
                for sample in iter_tar_samples(stream, url):
                    totals["samples"] += 1
                    members = {k: v for k, v in sample.items() if not k.startswith("__")}
                    exts.update(members.keys())
                    img, aud, cap = (
                        first_of(members, IMAGE_EXTS),
                        first_of(members, AUDIO_EXTS),
                        _caption(members),
                    )
                    coverage.update(
                        m
                        for m, ok in (
                            ("image", img),
                            ("audio", aud),
                            ("text", cap),
                            ("json", "json" in members),
                        )
                        if ok
                    )
                    if cap is not None:
                        captions[caption_bin(len(cap.split()))] += 1
                    if img is not None:
                        try:
                            with Image.open(io.BytesIO(img[1])) as im:
                                images[image_bin(max(im.size))] += 1
                        except Exception as e:
                            errors.append(f"{url}: sample {sample['__key__']!r}: image: {e}")
                    if aud is not None:
                        try:
                            audio_seconds.append(sf.info(io.BytesIO(aud[1])).duration)
                        except Exception as e:
                            errors.append(f"{url}: sample {sample['__key__']!r}: audio: {e}")
                    if max_samples and totals["samples"] >= max_samples:
                        break
            totals["shards"] += 1
        except Exception as e:
            errors.append(f"{url}: {type(e).__name__}: {e}")
        if max_samples and totals["samples"] >= max_samples:
            break
    n = totals["samples"]
    return {
        "shards": totals["shards"],
        "samples": n,
        "bytes": totals["bytes"],
        "mean_sample_bytes": round(totals["bytes"] / n) if n else 0,
        "coverage": {m: round(coverage[m] / n, 4) if n else 0.0 for m in ("image", "text", "audio", "json")},
        "extensions": dict(sorted(exts.items())),
        "caption_words_histogram": dict(sorted(captions.items(), key=lambda kv: _sort_key(kv[0]))),
        "image_size_histogram": dict(sorted(images.items(), key=lambda kv: _sort_key(kv[0]))),
        "audio_seconds": {
            "count": len(audio_seconds),
            "min": round(min(audio_seconds), 3) if audio_seconds else 0,
            "mean": round(sum(audio_seconds) / len(audio_seconds), 3) if audio_seconds else 0,
            "max": round(max(audio_seconds), 3) if audio_seconds else 0,
        },
        "errors": errors,
    }


def _sort_key(label: str) -> int:
    digits = "".join(c if c.isdigit() else " " for c in label).split()
    return int(digits[0]) + (1 if label.startswith(">") else 0) if digits else 0  # "<=32px" sorts as 32


def format_stats(stats: dict[str, Any]) -> str:
    n = stats["samples"] or 1
    lines = [
        f"shards: {stats['shards']}  samples: {stats['samples']}  bytes: {stats['bytes']:,}  "
        f"(mean {stats['mean_sample_bytes']:,} B/sample)",
        "coverage: " + "  ".join(f"{m} {v:.1%}" for m, v in stats["coverage"].items()),
        "members: " + "  ".join(f"{k} {v}" for k, v in stats["extensions"].items()),
    ]
    for title, key in (
        ("caption length (words)", "caption_words_histogram"),
        ("image size (longer side)", "image_size_histogram"),
    ):
        if stats[key]:
            lines.append(f"{title}:")
            width = max(stats[key].values())
            for label, count in stats[key].items():
                bar = "#" * max(1, round(40 * count / width))
                lines.append(f"  {label:>10} {count:>8} {count / n:6.1%} {bar}")
    a = stats["audio_seconds"]
    if a["count"]:
        lines.append(f"audio: {a['count']} clips, {a['min']}-{a['max']} s (mean {a['mean']} s)")
    if stats["errors"]:
        lines.append(f"errors ({len(stats['errors'])}):")
        lines += [f"  {e}" for e in stats["errors"][:20]]
    return "\n".join(lines)
