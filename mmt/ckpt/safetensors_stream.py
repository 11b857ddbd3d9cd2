"""Write a ``.safetensors`` file one tensor at a time.

The format is an 8-byte header length, a JSON header with every tensor's dtype, shape and byte range, then the raw
bytes. All shapes are known before any value is read, so the header goes first and each tensor is appended as
soon as it exists: memory holds one tensor, never the whole shard (``safetensors.torch.save_file`` needs the
whole dict in memory). Files are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from mmt.ckpt.layout import CheckpointError

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class SafetensorsStreamWriter:
    """Declare every tensor up front, then `write` them in that order; `close` renames the file into place."""

    def __init__(
        self,
        path: str | os.PathLike,
        specs: list[tuple[str, tuple[int, ...], torch.dtype]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self._specs = specs
        header: dict[str, object] = {"__metadata__": dict(metadata or {})}
        off = 0
        for name, shape, dtype in specs:
            if dtype not in DTYPE_NAMES:
                raise CheckpointError(f"{name}: dtype {dtype} cannot be stored in safetensors")
            n = nbytes(shape, dtype)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        self.data_bytes = off
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(len(raw) + 8) % 8)
        self._tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        self._f = open(self._tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, shape, dtype = self._specs[self._next]
        if name != exp_name or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise CheckpointError(
                f"{self.path}: expected {exp_name} {tuple(shape)} {dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        t = tensor.detach().contiguous().reshape(-1)
        if t.numel():
            self._f.write(t.view(torch.uint8).numpy().data if t.dtype != torch.bool else t.numpy().tobytes())
        self._next += 1

    def write_pieces(self, name: str, pieces: list[torch.Tensor]) -> None:
        """Write the next tensor given as 1-D pieces of its flattened values (in the declared dtype), each copied
        straight from its memory (a mapped checkpoint file) into the output, with no concatenated copy."""
        exp_name, shape, dtype = self._specs[self._next]
        n = sum(int(t.numel()) for t in pieces)
        if name != exp_name or n != math.prod(shape) or any(t.dtype != dtype for t in pieces):
            raise CheckpointError(
                f"{self.path}: expected {exp_name} {tuple(shape)} {dtype}, got {name} ({n} values)"
            )
        for t in pieces:
            if t.numel():
                t = t.contiguous()
                self._f.write(
                    t.view(torch.uint8).numpy().data if t.dtype != torch.bool else t.numpy().tobytes()
                )
        self._next += 1

    def close(self) -> Path:
        if self._next != len(self._specs):
            self.abort()
            raise CheckpointError(
                f"{self.path}: only {self._next} of {len(self._specs)} tensors were written"
            )
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)
