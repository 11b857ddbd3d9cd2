"""The one sample-key schema shared by the shard writer and every reader.

A sample is the group of consecutive tar members that share a key: ``KEY.jpg``, ``KEY.txt``, ``KEY.json`` and,
for audio, ``KEY.wav`` / ``KEY.flac`` -- the img2dataset / webdataset convention, so shards made by those tools
load unchanged. The key is the member path up to the first dot of its file name (webdataset's rule).
"""

from __future__ import annotations

import re
import unicodedata

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
AUDIO_EXTS = ("wav", "flac", "ogg", "mp3")
TEXT_EXTS = ("txt", "caption", "text")
JSON_EXTS = ("json",)

INDEX_SUFFIX = ".idx.json"
MANIFEST_NAME = "manifest.json"
ANSWERS_NAME = "answers.json"

_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def split_member(name: str) -> tuple[str, str] | None:
    """``"a/b/0001.seg.jpg"`` -> ``("a/b/0001", "seg.jpg")``; None for a name without an extension."""
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def first_of(sample: dict[str, bytes], exts: tuple[str, ...]) -> tuple[str, bytes] | None:
    """The first member of ``sample`` whose extension is in ``exts`` (in that order of preference)."""
    for ext in exts:
        if ext in sample:
            return ext, sample[ext]
    return None


def make_key(text: str) -> str:
    """A webdataset-safe key from a file stem or id: no dots or slashes, only ``[A-Za-z0-9_-]``."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")
    return key or "sample"


def normalize_answer(answer: str) -> str:
    """VQA answer normalisation used by the builder's vocabulary and the loader's targets alike."""
    answer = " ".join(str(answer).lower().strip().split())
    return answer.rstrip(".").strip()
