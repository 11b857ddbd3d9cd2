"""Deterministic tar shard writer: the same samples in the same order give byte-identical shards.

Every member gets a fixed mtime, uid/gid 0, empty user/group names and mode 0644, members of a sample are written
in sorted extension order, and shards are cut by sample count / byte size in input order. Each finished shard is
published atomically (local temp file + ``os.replace``, or one upload for fsspec URLs) together with its
``<shard>.idx.json`` byte-offset index, computed while writing.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
from dataclasses import asdict, dataclass

from mmt.data import storage
from mmt.data.schema import INDEX_SUFFIX
from mmt.data.tarindex import SampleSpan, ShardIndex

FIXED_MTIME = 946684800  # 2000-01-01T00:00:00Z: reproducible and accepted by every tar reader


@dataclass
class ShardInfo:
    name: str
    url: str
    samples: int
    bytes: int
    sha256: str


def tar_member(name: str, data: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = FIXED_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


class ShardSink:
    """Write samples (``{"__key__": k, "jpg": bytes, ...}``) into ``<out>/<prefix>-NNNNNN.tar`` shards."""

    def __init__(
        self,
        out: str,
        prefix: str = "shard",
        max_samples: int = 10000,
        max_bytes: int = 1 << 30,
        endpoint_url: str = "",
    ) -> None:
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("max_samples and max_bytes must be >= 1")
        self.out, self.prefix, self.endpoint_url = out.rstrip("/"), prefix, endpoint_url
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[ShardInfo] = []
        self._tmpdir = None if storage.is_remote(out) else os.path.abspath(out)
        if self._tmpdir:
            os.makedirs(self._tmpdir, exist_ok=True)
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._tmp = ""
        self._index: ShardIndex | None = None

    def _open(self) -> None:
        fd, self._tmp = tempfile.mkstemp(dir=self._tmpdir, prefix=".shard-", suffix=".tmp")
        self._file = os.fdopen(fd, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._index = ShardIndex(size=0)

    @staticmethod
    def encoded_size(sample: dict[str, bytes]) -> int:
        return sum(512 + (len(v) + 511) // 512 * 512 for k, v in sample.items() if k != "__key__")

    def write(self, sample: dict[str, bytes]) -> None:
        key = sample["__key__"]
        assert isinstance(key, str)
        size = self.encoded_size(sample)
        idx = self._index
        if self._tar is not None and idx is not None and idx.samples:
            if len(idx.samples) >= self.max_samples or self._tar.offset + size > self.max_bytes:
                self._finish()
        if self._tar is None:
            self._open()
        assert self._tar is not None and self._index is not None
        start = self._tar.offset
        for ext in sorted(k for k in sample if k != "__key__"):
            data = sample[ext]
            if isinstance(data, str):
                data = data.encode("utf-8")
            self._tar.addfile(tar_member(f"{key}.{ext}", data), io.BytesIO(data))
        self._index.samples.append(SampleSpan(key, start, self._tar.offset))

    def _finish(self) -> None:
        if self._tar is None or self._file is None or self._index is None:
            return
        self._tar.close()
        self._file.close()
        self._tar = None
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        url = storage.join(self.out, name)
        nbytes = os.path.getsize(self._tmp)
        with open(self._tmp, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        self._index.size = nbytes
        storage.write_file(self._tmp, url, self.endpoint_url)
        storage.write_bytes(self._index.to_json().encode(), url + INDEX_SUFFIX, self.endpoint_url)
        self.shards.append(ShardInfo(name, url, len(self._index.samples), nbytes, digest))
        self._index = None

    def close(self) -> list[ShardInfo]:
        self._finish()
        return self.shards

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tmp and os.path.exists(self._tmp):
            os.unlink(self._tmp)

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def shard_infos_as_dicts(shards: list[ShardInfo]) -> list[dict]:
    return [asdict(s) for s in shards]
