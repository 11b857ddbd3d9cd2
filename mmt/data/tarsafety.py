"""Shards are untrusted input: which tar members mmt refuses to read, and the streaming reader that skips them.

A shard can name a member ``../../x`` or ``/etc/x``, hold symlinks or hard links, or a member of gigabytes. mmt
never extracts a member anywhere (members are sliced out of the tar stream in memory), but a sample with such a
member is still skipped and counted with its reason (`member_problem`), and a member larger than
``data.max_member_mb`` is never read into memory: a 1 GB JSON costs a skip, not the node's RAM.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import IO, Any

from mmt.data.samples import SampleFailure
from mmt.data.schema import split_member

DEFAULT_MAX_MEMBER_BYTES = 256 * 2**20


def member_problem(info: tarfile.TarInfo, max_bytes: int) -> str | None:
    """Why the sample holding ``info`` must be skipped, or None when the member is an ordinary file."""
    name = info.name
    problem = name_problem(name)
    if problem is not None:
        return problem
    if info.issym() or info.islnk():
        return f"member {name!r} is a {'symlink' if info.issym() else 'hard link'} to {info.linkname!r}"
    if info.isreg():
        return size_problem(name, info.size, max_bytes)
    return None


def name_problem(name: str) -> str | None:
    """An absolute or ``..`` member path (refused even though mmt never extracts members to disk)."""
    if name.startswith("/") or name.startswith("\\") or ".." in name.replace("\\", "/").split("/"):
        return f"member {name!r} has an absolute or '..' path"
    return None


def size_problem(name: str, size: int, max_bytes: int) -> str | None:
    """A regular member larger than ``max_bytes`` (0: no limit): never read into memory."""
    if max_bytes > 0 and size > max_bytes:
        return f"member {name!r} is {size:,} bytes, more than data.max_member_mb allows ({max_bytes:,})"
    return None


def member_key(name: str) -> str:
    """The sample key a (possibly hostile) member name belongs to, for naming it in a skip."""
    parts = split_member(name)
    return parts[0] if parts else name


def iter_tar_samples_safe(
    stream: IO[bytes], url: str, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
) -> Iterator[dict[str, Any] | SampleFailure]:
    """Samples (``{"__key__", "__url__", ext: bytes}``) of a tar stream, in order; a sample with a member that
    `member_problem` refuses becomes a `SampleFailure` naming the shard, the key and the reason. Refused
    members are skipped in the stream without being read into memory."""
    current: dict[str, Any] | None = None
    bad: tuple[str, str] | None = None  # (key, reason) of the sample being skipped

    def finish() -> Iterator[dict[str, Any] | SampleFailure]:
        if bad is not None:
            yield SampleFailure(url, bad[0], bad[1])
        elif current is not None:
            yield current

    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for info in tar:
            if info.isdir():
                continue
            key = member_key(info.name)
            same = (bad is not None and bad[0] == key) or (current is not None and current["__key__"] == key)
            if not same:
                yield from finish()
                current, bad = None, None
            problem = member_problem(info, max_member_bytes)
            if problem is not None or bad is not None:
                if bad is None:
                    bad = (key, problem)
                current = None
                continue
            parts = split_member(info.name)
            if parts is None or not info.isreg():
                continue
            f = tar.extractfile(info)
            if f is None:
                continue
            if current is None:
                current = {"__key__": key, "__url__": url}
            current[parts[1]] = f.read()
        yield from finish()
