"""Small explicit registries keyed by name: one per family of interchangeable parts.

A config field declares ``registry="attention"``; the config layer checks the value against the names it declares
for that family (`mmt.config.kinds.KINDS`), and the model asks the registry here for the class. Registering a name
the config does not declare fails at import. The registering modules are imported by ``mmt/model/__init__.py``, so
every registry is full as soon as anything in `mmt.model` is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from mmt.config.kinds import KINDS

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, family: str) -> None:
        self.family = family
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        if name not in KINDS[self.family]:
            raise KeyError(
                f"{self.family} {name!r} is not declared in mmt.config.kinds.KINDS[{self.family!r}]"
            )

        def deco(obj: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.family} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.family} kind {name!r}; registered: {self.names()}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


ATTENTION: Registry[type] = Registry("attention")
POSITIONAL: Registry[type] = Registry("positional")
FFN: Registry[type] = Registry("ffn")
NORM: Registry[type] = Registry("norm")
FUSION: Registry[type] = Registry("fusion")
POOLING: Registry[type] = Registry("pooling")

REGISTRIES: dict[str, Registry] = {r.family: r for r in (ATTENTION, POSITIONAL, FFN, NORM, FUSION, POOLING)}
