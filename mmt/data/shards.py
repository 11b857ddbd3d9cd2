"""The shard catalog (which shards, how many samples, where each sample lies) and the per-worker sample reader.

`ShardCatalog.open` finds every shard's index: the builder's ``<shard>.idx.json`` sidecar when its size
matches the shard, else a cached scan, else a fresh scan of the tar headers (remote shards are fetched whole into
the node-local cache first). A missing or unreadable shard is skipped and listed in ``failures``; the caller
decides whether too many failed.

`SampleReader` turns (shard, sample) into the sample's members: it seeks to the sample's byte range in the local
file (or the cached copy of a remote shard), reads it with one call and splits it (a tar stream of its own) at
its plain ustar headers (`mmt.data.tarmembers`), or with the standard library's tar reader when the range holds
anything else. Whole-shard iteration (`iter_tar_samples`) uses webdataset's tar iterator.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import socket
import tarfile
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from webdataset.tariterators import group_by_keys, tar_file_iterator

from mmt.data import storage
from mmt.data.iostats import COUNTERS
from mmt.data.schema import INDEX_SUFFIX, split_member
from mmt.data.tarindex import ShardIndex, scan_file
from mmt.data.tarmembers import split_plain
from mmt.data.tarsafety import DEFAULT_MAX_MEMBER_BYTES, member_problem

log = logging.getLogger(__name__)


def iter_tar_samples(stream: io.IOBase, url: str) -> Iterator[dict[str, Any]]:
    """Samples of a tar stream with webdataset's own reader (``{"__key__", "__url__", ext: bytes}``)."""
    files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
    yield from group_by_keys(files)


def default_cache_dir() -> str:
    """``$MMT_DATA_CACHE``, else a per-user, per-host folder in the temp dir.

    The host name is part of the default so that nodes whose temp dir is shared (a networked /tmp, or the local
    multi-node cluster's namespaces on one machine) still each fill their own cache: the cache cap and the
    per-node fetch counts are per node, and no cache is ever written by two nodes at once.
    """
    return os.environ.get("MMT_DATA_CACHE") or os.path.join(
        tempfile.gettempdir(), f"mmt-data-cache-{os.getuid()}-{socket.gethostname()}"
    )


@dataclass(frozen=True)
class StorageSettings:
    """What a worker needs to reach the shards: picklable, no live filesystem objects."""

    cache_dir: str
    endpoint_url: str = ""
    retries: int = 4
    backoff_s: float = 0.5
    cache_max_bytes: int = (
        0  # 0: unlimited; LRU eviction by readers (the read-ahead planner sets 0: it evicts)
    )
    remote_read: str = "shard"  # shard: whole shards into the node cache; range: one ranged GET per sample
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES  # a larger member skips its sample unread (tarsafety)


class ShardCache:
    """Whole remote shards copied to node-local disk once, shared by every rank and worker on the node.

    A per-shard ``flock`` makes concurrent readers wait for one download instead of each fetching the shard, and
    the download lands under a temporary name renamed into place, so no reader ever sees a partial file.
    """

    def __init__(self, settings: StorageSettings) -> None:
        self.settings = settings
        self.root = os.path.join(settings.cache_dir, "shards")

    def path_for(self, url: str) -> str:
        digest = hashlib.sha1(url.encode()).hexdigest()[:16]
        return os.path.join(self.root, f"{digest}-{os.path.basename(url)}")

    def cached(self, url: str, expected_size: int | None = None) -> str | None:
        """The local copy's path if it is complete, else None."""
        if not storage.is_remote(url):
            return url.removeprefix("file://")
        path = self.path_for(url)
        try:
            if expected_size is None or os.path.getsize(path) == expected_size:
                return path
        except FileNotFoundError:
            pass
        return None

    def fetch(self, url: str, expected_size: int | None = None) -> str:
        if not storage.is_remote(url):
            return url.removeprefix("file://")
        path = self.path_for(url)
        if self.cached(url, expected_size):
            try:
                os.utime(path)  # recently used: evicted last
            except FileNotFoundError:  # evicted just now: fetch it below
                pass
            else:
                return path
        os.makedirs(self.root, exist_ok=True)
        with open(path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if not (
                    os.path.exists(path) and (expected_size is None or os.path.getsize(path) == expected_size)
                ):
                    s = self.settings
                    storage.download(url, path, s.endpoint_url, s.retries, s.backoff_s)
                    COUNTERS.add(bytes_fetched=os.path.getsize(path), shard_fetches=1, fetched=url)
                    if s.cache_max_bytes > 0:
                        self.evict(keep=path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return path

    def evict(self, keep: str) -> None:
        """Delete least recently used shards until the cache fits ``cache_max_bytes``.

        Readers that still hold an evicted file open keep reading it (POSIX); a later open fetches it again.
        """
        entries = []
        for name in os.listdir(self.root):
            p = os.path.join(self.root, name)
            if name.endswith((".lock", ".tmp")) or name.startswith(".") or p == keep:
                continue
            try:
                st = os.stat(p)
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime, st.st_size, p))
        total = sum(e[1] for e in entries) + os.path.getsize(keep)
        for _, nbytes, p in sorted(entries):
            if total <= self.settings.cache_max_bytes:
                break
            try:
                os.unlink(p)
                total -= nbytes
            except FileNotFoundError:
                pass


@dataclass
class ShardCatalog:
    urls: list[str]
    sizes: list[int]
    keys: list[list[str]]
    spans: list[np.ndarray]  # per shard: (n, 2) int64 [start, end)
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (url, key, error)
    num_requested: int = 0

    @property
    def counts(self) -> np.ndarray:
        return np.array([len(k) for k in self.keys], dtype=np.int64)

    @property
    def num_samples(self) -> int:
        return int(sum(len(k) for k in self.keys))

    def fingerprint(self) -> str:
        """Identifies the sample order's basis: shard URLs and sample counts (not the storage location's host)."""
        h = hashlib.sha1()
        for url, keys in zip(self.urls, self.keys):
            h.update(f"{os.path.basename(url)}:{len(keys)};".encode())
        return h.hexdigest()[:16]

    @classmethod
    def open(cls, urls: list[str], settings: StorageSettings, threads: int = 8) -> ShardCatalog:
        """Index every shard of ``urls`` (in order); a shard that cannot be indexed is listed in ``failures``."""
        sizes = _list_sizes(urls, settings)
        with ThreadPoolExecutor(max(1, min(threads, len(urls)))) as pool:
            results = list(pool.map(lambda u: _index_one(u, sizes.get(u), settings), urls))
        cat = cls(urls=[], sizes=[], keys=[], spans=[], num_requested=len(urls))
        for url, (index, error) in zip(urls, results):
            if index is None:
                cat.failures.append((url, "<shard>", error or "unreadable"))
                log.warning("skipping shard %s: %s", url, error)
                continue
            for err in index.errors:
                hostile = (
                    ": skipped: " in err
                )  # one sample left out (tarsafety), the rest of the shard is fine
                cat.failures.append((url, "<sample>" if hostile else "<tail>", err))
                if hostile:
                    log.warning("skipping sample: %s", err)
                else:
                    log.warning("shard %s is damaged, using the samples before the damage: %s", url, err)
            cat.urls.append(url)
            cat.sizes.append(index.size)
            cat.keys.append([s.key for s in index.samples])
            cat.spans.append(
                np.array([[s.start, s.end] for s in index.samples], dtype=np.int64).reshape(-1, 2)
            )
        return cat


def _list_sizes(urls: list[str], settings: StorageSettings) -> dict[str, int]:
    """Shard sizes; one listing per remote folder instead of one HEAD per shard."""
    sizes: dict[str, int] = {}
    remote_dirs = sorted({storage.dirname(u) for u in urls if storage.is_remote(u)})
    for d in remote_dirs:
        fs, path = storage.filesystem(d, settings.endpoint_url)
        proto = storage.protocol(d)
        try:
            entries = storage.retry(
                lambda fs=fs, path=path: fs.ls(path, detail=True, refresh=True),
                f"listing {d}",
                settings.retries,
                settings.backoff_s,
            )
        except (FileNotFoundError, storage.StorageError) as e:
            log.warning("cannot list %s: %s", d, e)
            continue
        for e in entries:
            if e.get("type") == "file":
                sizes[f"{proto}://{e['name']}"] = int(e["size"])
    for u in urls:
        if not storage.is_remote(u):
            p = u.removeprefix("file://")
            if os.path.isfile(p):
                sizes[u] = os.path.getsize(p)
    return sizes


def _computed_index_path(url: str, size: int, settings: StorageSettings) -> str:
    digest = hashlib.sha1(f"{url}\0{size}".encode()).hexdigest()[:20]
    return os.path.join(settings.cache_dir, "index", digest + INDEX_SUFFIX)


def _index_one(url: str, size: int | None, settings: StorageSettings) -> tuple[ShardIndex | None, str | None]:
    if size is None:
        return None, "shard not found"
    sidecar = url + INDEX_SUFFIX
    try:
        data = storage.read_bytes(sidecar, settings.endpoint_url, settings.retries, settings.backoff_s)
        index = ShardIndex.from_json(data, sidecar)
        if index.size == size:
            return index, None
        log.warning("%s: index is for %d bytes but the shard has %d; rescanning", sidecar, index.size, size)
    except FileNotFoundError:
        pass
    except (ValueError, storage.StorageError) as e:
        log.warning("%s: %s; rescanning the shard", sidecar, e)
    cached = _computed_index_path(url, size, settings)
    if os.path.exists(cached):
        try:
            with open(cached) as f:
                return ShardIndex.from_json(f.read(), cached), None
        except (OSError, ValueError):
            pass
    try:
        local = ShardCache(settings).fetch(url, size)
        index = scan_file(local, url, max_member_bytes=settings.max_member_bytes)
    except (OSError, storage.StorageError) as e:
        return None, f"{type(e).__name__}: {e}"
    if not index.samples and index.errors:
        return None, "; ".join(index.errors)
    try:
        storage.write_bytes(index.to_json().encode(), cached)
    except OSError as e:  # a read-only cache only costs a rescan next time
        log.warning("cannot cache the index of %s: %s", url, e)
    return index, None


class SampleReader:
    """Reads samples by (shard, position) from local files; keeps a few file handles open per process."""

    def __init__(self, catalog: ShardCatalog, settings: StorageSettings, max_open: int = 16) -> None:
        self.catalog, self.settings, self.max_open = catalog, settings, max_open
        self._files: OrderedDict[int, io.BufferedReader] = OrderedDict()
        self._cache: ShardCache | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"] = OrderedDict()
        state["_cache"] = None
        return state

    def _file(self, shard: int) -> io.BufferedReader:
        f = self._files.get(shard)
        if f is not None:
            self._files.move_to_end(shard)
            if storage.is_remote(self.catalog.urls[shard]):
                COUNTERS.add(cache_hits=1)
            return f
        if self._cache is None:
            self._cache = ShardCache(self.settings)
        url, size = self.catalog.urls[shard], self.catalog.sizes[shard]
        path = self._cache.cached(url, size)
        if path is None:  # not prefetched (yet): wait for the download (ours or another reader's)
            t0 = time.perf_counter()
            path = self._cache.fetch(url, size)
            COUNTERS.add(wait_s=time.perf_counter() - t0, cache_misses=1)
        elif storage.is_remote(url):
            COUNTERS.add(cache_hits=1)
        f = open(path, "rb")  # noqa: SIM115 -- kept open for later samples of the same shard
        self._files[shard] = f
        while len(self._files) > self.max_open:
            self._files.popitem(last=False)[1].close()
        return f

    def _bytes(self, shard: int, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a shard: from the local (cached) file, or one ranged GET in range mode."""
        url = self.catalog.urls[shard]
        if self.settings.remote_read == "range" and storage.is_remote(url):
            s = self.settings
            data = storage.read_range(url, start, end, s.endpoint_url, s.retries, s.backoff_s)
            COUNTERS.add(bytes_fetched=len(data), range_reads=1)
            return data
        f = self._file(shard)
        f.seek(start)
        return f.read(end - start)

    def read(self, shard: int, pos: int) -> tuple[str, dict[str, bytes]]:
        """``(key, {ext: bytes})``; raises with a message naming the problem when the range is not that sample."""
        key = self.catalog.keys[shard][pos]
        start, end = (int(x) for x in self.catalog.spans[shard][pos])
        cap = self.settings.max_member_bytes
        if cap > 0 and end - start > 4 * cap:  # only a sidecar index written with the shard can point here
            raise ValueError(
                f"sample span of {end - start:,} bytes, more than 4 x data.max_member_mb; not read"
            )
        data = self._bytes(shard, start, end)
        if len(data) != end - start:
            raise ValueError(
                f"shard is shorter than its index ({len(data)} of {end - start} bytes at {start})"
            )
        members = split_plain(data, key, cap)  # plain ustar headers (nearly every shard): no tarfile
        if members is None:
            members = _split_with_tarfile(data, key, cap)
        if not members:
            raise ValueError("no members at the indexed offset: stale index?")
        return key, members

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def _split_with_tarfile(data: bytes, key: str, cap: int) -> dict[str, bytes]:
    """`split_plain`'s fallback: the range is a complete tar stream of the sample's members, parsed by the
    standard library's reader (PAX, GNU long names, links ...); the data is sliced out of the buffer."""
    members: dict[str, bytes] = {}
    for info in tarfile.open(fileobj=io.BytesIO(data), mode="r:"):
        problem = member_problem(info, cap)  # the index may be a sidecar the shard's maker wrote
        if problem is not None:
            raise ValueError(problem)
        if not info.isreg():
            continue
        parts = split_member(info.name)
        if parts is None:
            continue
        if parts[0] != key:
            raise ValueError(f"member {info.name!r} does not belong to sample {key!r}: stale index?")
        if info.offset_data + info.size > len(data):
            raise ValueError(f"member {info.name!r} runs past the indexed range: stale index?")
        members[parts[1]] = data[info.offset_data : info.offset_data + info.size]
    return members


def load_answer_vocab(url: str, settings: StorageSettings) -> list[str]:
    """``{"answers": [...]}`` or a plain JSON list."""
    data = json.loads(storage.read_bytes(url, settings.endpoint_url, settings.retries, settings.backoff_s))
    answers = data.get("answers") if isinstance(data, dict) else data
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{url}: expected a JSON list of answers or {{'answers': [...]}}")
    return answers
