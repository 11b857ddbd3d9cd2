"""Using a trained model: raw text / images / audio in, embeddings and zero-shot classification out.

Imports are lazy so ``import mmt`` stays cheap; everything here is also reachable as ``mmt.<name>``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "InputError": "mmt.inference.media",
    "Waveform": "mmt.inference.media",
    "load_image": "mmt.inference.media",
    "load_audio": "mmt.inference.media",
    "Preprocess": "mmt.inference.preprocess",
    "create_model_and_transforms": "mmt.inference.factory",
    "get_tokenizer": "mmt.inference.factory",
    "zero_shot_classifier": "mmt.inference.zero_shot",
    "zero_shot_accuracy": "mmt.inference.zero_shot",
    "topk_accuracy": "mmt.inference.zero_shot",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mmt.inference' has no attribute {name!r}")
