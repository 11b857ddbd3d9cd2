"""Resolve a tower's settings: its own non-None fields over the shared `ModelConfig` ones."""

from __future__ import annotations

import dataclasses

from mmt.config.model import DecoderConfig, EncoderConfig, ModelConfig

_SHARED = [f.name for f in dataclasses.fields(ModelConfig)]


def resolve_spec(shared: ModelConfig, tower: EncoderConfig | DecoderConfig | None = None) -> ModelConfig:
    """A plain `ModelConfig` with every field decided (what blocks are built from)."""
    values = {}
    for name in _SHARED:
        own = getattr(tower, name, None) if tower is not None and hasattr(tower, name) else None
        values[name] = own if own is not None else getattr(shared, name)
    return ModelConfig(**values)
