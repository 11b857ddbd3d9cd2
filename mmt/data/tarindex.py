"""Per-shard byte-offset indexes: where each sample of a tar shard starts and ends.

The index is what makes exact resume cheap: a reader seeks straight to sample ``j`` of shard ``i`` instead of
re-reading everything before it. The shard builder writes it beside each shard as ``<shard>.idx.json``; for shards
made by other tools it is computed once by scanning the tar headers (no member data is read) and cached.

A sample's range starts at the header of its first member (for PAX/GNU long names, at the extended header before
it) and ends after the padded data of its last member, so the bytes ``[start, end)`` are themselves a valid tar
stream of that sample.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass, field
from typing import IO

from mmt.data.schema import split_member
from mmt.data.tarsafety import member_key, member_problem

INDEX_FORMAT = "mmt-tar-index/1"


@dataclass
class SampleSpan:
    key: str
    start: int
    end: int


@dataclass
class ShardIndex:
    """Samples of one shard, in tar order, plus the shard's byte size (to detect a stale index)."""

    size: int
    samples: list[SampleSpan] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": INDEX_FORMAT,
                "size": self.size,
                "samples": [[s.key, s.start, s.end] for s in self.samples],
                "errors": self.errors,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> ShardIndex:
        try:
            data = json.loads(text)
            if data.get("format") != INDEX_FORMAT:
                raise ValueError(f"format {data.get('format')!r} is not {INDEX_FORMAT!r}")
            samples = [SampleSpan(str(k), int(s), int(e)) for k, s, e in data["samples"]]
            return cls(size=int(data["size"]), samples=samples, errors=list(data.get("errors", [])))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{source}: not a valid shard index: {e}") from e


def _padded(n: int) -> int:
    return (n + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE * tarfile.BLOCKSIZE


def scan_tar(fileobj: IO[bytes], size: int, url: str, max_member_bytes: int = 0) -> ShardIndex:
    """Index a seekable tar stream of ``size`` bytes by reading its headers only.

    A member whose data runs past the end (a truncated shard) ends the scan; the samples before it are kept and
    the problem is listed in ``errors`` (naming the URL and the key) rather than raised, so one bad shard costs
    only its damaged tail.
    """
    index = ShardIndex(size=size)
    current: SampleSpan | None = None
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r:")
        bad_key = None
        for info in tar:
            problem = member_problem(info, max_member_bytes)
            if problem is not None:  # a hostile member: its sample stays out of the index, counted as skipped
                key = member_key(info.name)
                index.errors.append(f"{url}: sample {key!r}: skipped: {problem}")
                if current is not None and current.key == key:
                    index.samples.pop()
                current, bad_key = None, key
                tar.members = []
                continue
            if not info.isreg():
                continue
            parts = split_member(info.name)
            if parts is None:
                continue
            key, _ = parts
            if key == bad_key:
                continue
            end = info.offset_data + _padded(info.size)
            if info.offset_data + info.size > size:
                index.errors.append(f"{url}: sample {key!r}: member {info.name!r} is truncated")
                if current is not None and current.key == key:
                    index.samples.pop()
                break
            if current is not None and current.key == key:
                current.end = end
            else:
                current = SampleSpan(key, info.offset, end)
                index.samples.append(current)
            tar.members = []  # do not keep every TarInfo alive
    except (tarfile.TarError, EOFError, OSError) as e:
        last = index.samples[-1].key if index.samples else None
        index.errors.append(f"{url}: unreadable tar after sample {last!r}: {type(e).__name__}: {e}")
    return index


def scan_file(path: str, url: str | None = None, max_member_bytes: int = 0) -> ShardIndex:
    with open(path, "rb") as f:
        return scan_tar(f, os.path.getsize(path), url or path, max_member_bytes)
