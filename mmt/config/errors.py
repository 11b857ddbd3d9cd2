"""The one error type for bad configuration: it always names the file (or the command line) and the key."""

from __future__ import annotations


class ConfigError(ValueError):
    def __init__(self, source: str, key: str, message: str) -> None:
        self.source, self.key, self.message = source, key, message
        super().__init__(f"{source}: {key}: {message}")
