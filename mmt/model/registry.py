"""Small explicit registries keyed by name: one per family of interchangeable parts.

A config field declares ``registry="attention"``; the validator checks the value against the keys here, and the
model asks the registry for the class. Adding a variant is one decorated class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, family: str) -> None:
        self.family = family
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.family} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            _load_all()
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.family} kind {name!r}; registered: {self.names()}") from None

    def names(self) -> list[str]:
        _load_all()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        _load_all()
        return name in self._items


ATTENTION: Registry[type] = Registry("attention")
POSITIONAL: Registry[type] = Registry("positional")
FFN: Registry[type] = Registry("ffn")
NORM: Registry[type] = Registry("norm")
FUSION: Registry[type] = Registry("fusion")
POOLING: Registry[type] = Registry("pooling")

REGISTRIES: dict[str, Registry] = {r.family: r for r in (ATTENTION, POSITIONAL, FFN, NORM, FUSION, POOLING)}


def _load_all() -> None:
    """Import the modules whose decorators fill the registries (idempotent)."""
    import mmt.model.attention  # noqa: F401
    import mmt.model.ffn  # noqa: F401
    import mmt.model.fusion  # noqa: F401
    import mmt.model.norms  # noqa: F401
    import mmt.model.pooling  # noqa: F401
    import mmt.model.positional  # noqa: F401
