"""Checkpoint tools: inspect, convert to safetensors, reshard to another world size, load pretrained weights.

Imports are lazy: ``import mmt.ckpt`` must stay cheap (the trainer imports it on every resume).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "mmt.ckpt.layout",
    "ZeroCheckpoint": "mmt.ckpt.reader",
    "convert_checkpoint": "mmt.ckpt.convert",
    "inspect_checkpoint": "mmt.ckpt.inspect",
    "to_universal": "mmt.ckpt.universal",
    "check_resumable": "mmt.ckpt.resume",
    "load_for_resume": "mmt.ckpt.resume",
    "rank_rng_state": "mmt.ckpt.resume",
    "rank_loader_state": "mmt.ckpt.resume",
    "load_pretrained": "mmt.ckpt.pretrained",
    "create_pretrained": "mmt.ckpt.pretrained",
    "init_weights": "mmt.ckpt.pretrained",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mmt.ckpt' has no attribute {name!r}")
