"""Field helpers: a config field carries its docstring, allowed values and bounds in dataclass metadata.

`mmt.config.validate` walks the resolved tree and checks every field against this metadata, so a bad value gets
an error naming the full key path and the file it came from.
"""

from __future__ import annotations

from dataclasses import MISSING, field
from typing import Any


def cfg_field(
    default: Any = MISSING,
    *,
    doc: str,
    choices: tuple[str, ...] | None = None,
    registry: str | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    default_factory: Any = MISSING,
) -> Any:
    """A dataclass field with a docstring (``doc``) and optional checks.

    ``registry`` names a registry family: the value must be one of the names `mmt.config.kinds.KINDS` declares for
    it, which `mmt.model.registry` holds the registered implementations to.
    """
    meta = {"doc": doc, "choices": choices, "registry": registry, "ge": ge, "gt": gt, "le": le}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)
