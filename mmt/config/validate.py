"""Check every field of a config tree against the metadata declared with `cfg_field`."""

from __future__ import annotations

import dataclasses
from typing import Any

from mmt.config.errors import ConfigError
from mmt.config.kinds import KINDS


def validate(obj: Any, source: str, prefix: str = "") -> None:
    """Raise `ConfigError` at the first field whose value breaks its declared choices, registry or bounds."""
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        meta = f.metadata
        if dataclasses.is_dataclass(value):
            validate(value, source, key + ".")
            continue
        if value is None or not meta:
            continue
        allowed = meta.get("choices")
        if meta.get("registry"):
            allowed = tuple(sorted(KINDS[meta["registry"]]))
        if allowed is not None and value not in allowed:
            raise ConfigError(source, key, f"{value!r} is not one of {list(allowed)}")
        for bound, ok, word in (
            ("ge", lambda v, b: v >= b, ">="),
            ("gt", lambda v, b: v > b, ">"),
            ("le", lambda v, b: v <= b, "<="),
        ):
            b = meta.get(bound)
            if b is not None and isinstance(value, (int, float)) and not ok(value, b):
                raise ConfigError(source, key, f"{value!r} must be {word} {b}")
    check = getattr(type(obj), "check", None)
    if callable(check):
        check(obj, source, prefix)
