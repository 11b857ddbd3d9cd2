"""The members of one indexed sample: its tar byte range split into ``{ext: bytes}`` without the `tarfile` module.

Why: the loader reads every sample through its byte range (`mmt.data.shards.SampleReader`), and parsing that range
with `tarfile` (a `TarFile`, a `TarInfo` per header, eleven numeric fields each) was a fifth of a worker's time.
A sample's range written by mmt, webdataset or GNU/BSD tar is almost always plain ustar: one 512-byte header per
regular member, then its data padded to 512 bytes. `split_plain` reads just what the loader needs from such
headers (name, size, type, checksum) and applies the same safety rules as the rest of mmt (`mmt.data.tarsafety`);
anything else in the range (PAX / GNU long-name headers, links, directories, base-256 sizes, a ustar name prefix,
a signed checksum) makes it return None, and the caller parses the range with `tarfile` as before.
"""

from __future__ import annotations

from mmt.data.schema import split_member
from mmt.data.tarsafety import name_problem, size_problem

BLOCK = 512
_REGULAR = (0x30, 0x00)  # typeflag '0' and the old NUL


def _octal(field: bytes) -> int | None:
    """A NUL/space-terminated octal number field, or None when it is not one (base-256, garbage)."""
    end = field.find(b"\0")
    text = (field if end < 0 else field[:end]).strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        return None


def split_plain(data: bytes, key: str, max_member_bytes: int) -> dict[str, bytes] | None:
    """``{ext: member bytes}`` of the sample ``key`` whose tar range is ``data``, or None when the range holds
    anything but plain ustar headers of regular files (the caller then uses `tarfile`).

    Raises ValueError naming the problem for what `tarfile` would also refuse or mmt skips: a hostile name, a
    member over ``max_member_bytes``, a member of another sample or one that runs past the range (stale index).
    """
    members: dict[str, bytes] = {}
    offset, total = 0, len(data)
    while offset + BLOCK <= total:
        header = data[offset : offset + BLOCK]
        if header[156] not in _REGULAR or header[345] != 0:  # not a regular file, or a ustar name prefix
            return None
        chksum = _octal(header[148:156])
        if chksum is None or chksum != sum(header) - sum(header[148:156]) + 256:
            if not header.strip(b"\0"):  # an end-of-archive block: tarfile stops here too
                break
            return None  # tarfile also accepts the signed sum, or raises a clear "bad checksum"
        size = _octal(header[124:136])
        if size is None:
            return None
        end = header.find(b"\0", 0, 100)
        name = header[: 100 if end < 0 else end].decode("utf-8", "surrogateescape")
        if name.endswith("/"):  # an old-style directory
            return None
        problem = name_problem(name) or size_problem(name, size, max_member_bytes)
        if problem is not None:
            raise ValueError(problem)
        start = offset + BLOCK
        if start + size > total:
            raise ValueError(f"member {name!r} runs past the indexed range: stale index?")
        parts = split_member(name)
        if parts is not None:
            if parts[0] != key:
                raise ValueError(f"member {name!r} does not belong to sample {key!r}: stale index?")
            members[parts[1]] = data[start : start + size]
        offset = start + (size + BLOCK - 1) // BLOCK * BLOCK
    if offset < total and data[offset:].strip(b"\0"):  # a trailing partial header: let tarfile name it
        return None
    return members
