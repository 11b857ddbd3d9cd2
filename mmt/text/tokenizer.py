"""Tokenizers. The default is byte-level so nothing is ever downloaded; a `tokenizers` JSON file also works.

Both share one contract: ids ``pad=0``, ``bos``, ``eos`` known to the model (the captioning decoder starts from
``bos`` and stops at ``eos``), and ``encode`` truncates to ``max_len`` including the special tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer as HFTokenizer


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str, max_len: int | None = None) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes shifted by 3: 0 = pad, 1 = bos, 2 = eos, 3..258 = bytes."""

    pad_id = 0
    bos_id = 1
    eos_id = 2
    offset = 3
    vocab_size = 256 + 3

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        ids = [self.bos_id] + [b + self.offset for b in text.encode("utf-8")] + [self.eos_id]
        if max_len is not None and len(ids) > max_len:
            ids = ids[: max_len - 1] + [self.eos_id]
        return ids

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")


class JsonTokenizer:
    """A Hugging Face ``tokenizers`` JSON file given by path (never fetched from a hub)."""

    def __init__(self, path: str | Path, pad: str = "<pad>", bos: str = "<s>", eos: str = "</s>") -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        self._tok = HFTokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()
        ids = {}
        for name, token in (("pad", pad), ("bos", bos), ("eos", eos)):
            tid = self._tok.token_to_id(token)
            if tid is None:
                raise ValueError(f"tokenizer {path} has no {name} token {token!r}")
            ids[name] = tid
        self.pad_id, self.bos_id, self.eos_id = ids["pad"], ids["bos"], ids["eos"]

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        ids = [self.bos_id] + self._tok.encode(text, add_special_tokens=False).ids + [self.eos_id]
        if max_len is not None and len(ids) > max_len:
            ids = ids[: max_len - 1] + [self.eos_id]
        return ids

    def decode(self, ids: list[int]) -> str:
        special = {self.pad_id, self.bos_id, self.eos_id}
        return self._tok.decode([i for i in ids if i not in special])


def build_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` or a path to a ``tokenizers`` JSON file."""
    if spec == "byte":
        return ByteTokenizer()
    return JsonTokenizer(spec)
