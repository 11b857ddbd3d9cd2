"""Reading and writing shard URLs through fsspec: local paths, ``s3://`` (any S3-compatible endpoint) and the rest.

Filesystems are created lazily per process (s3fs is not fork-safe: one made in the parent must never be used in
a forked DataLoader worker), remote reads are retried with exponential backoff, and webdataset's ``gopen`` table
gets an fsspec opener for the object-store schemes it lacks, so ``wds.WebDataset("s3://...")`` works too.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from typing import IO, Any, TypeVar

import fsspec
import webdataset as wds
from webdataset.shardlists import expand_urls

log = logging.getLogger(__name__)
T = TypeVar("T")

REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "hdfs", "memory")
_FS_CACHE: dict[tuple[int, str, str], Any] = {}


class StorageError(OSError):
    """A shard or file could not be read or written, after retries; the message names the URL."""


def expand(urls: str | list[str]) -> list[str]:
    """Brace-expand ``"s3://b/p/shard-{000000..000099}.tar"`` (``::`` separates several patterns)."""
    if isinstance(urls, list):
        return [u for pattern in urls for u in expand(pattern)]
    return [u for u in expand_urls(urls.strip()) if u]


def protocol(url: str) -> str:
    """``"s3"`` for ``s3://b/k``, ``"file"`` for a plain path."""
    return url.split("://", 1)[0] if "://" in url else "file"


def is_remote(url: str) -> bool:
    return protocol(url) not in ("file", "local")


def resolve_endpoint(endpoint_url: str = "") -> str:
    """The configured endpoint, else the standard ``AWS_ENDPOINT_URL`` (``AWS_ENDPOINT_URL_S3``), else AWS."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", "")


def filesystem(url: str, endpoint_url: str = "") -> tuple[Any, str]:
    """``(fs, path)`` for ``url``; the filesystem object is cached per process and per endpoint."""
    proto = protocol(url)
    endpoint = resolve_endpoint(endpoint_url) if proto in ("s3", "s3a") else ""
    cache_key = (os.getpid(), proto, endpoint)
    fs = _FS_CACHE.get(cache_key)
    if fs is None:
        options: dict[str, Any] = {}
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
        if proto in ("s3", "s3a"):
            # one fresh client per process; instance caching would hand a forked child its parent's event loop
            options["skip_instance_cache"] = True
        fs = fsspec.filesystem(proto, **options)
        _FS_CACHE[cache_key] = fs
    path = fs._strip_protocol(url) if proto != "file" else os.path.abspath(url)
    return fs, path


def retry(fn: Callable[[], T], what: str, retries: int = 4, backoff_s: float = 0.5) -> T:
    """Call ``fn``; on an I/O error retry ``retries`` times with exponential backoff; a missing file is final."""
    delay = backoff_s
    for attempt in range(retries + 1):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except (OSError, ConnectionError, TimeoutError, RuntimeError) as e:
            if attempt == retries:
                raise StorageError(
                    f"{what}: failed after {retries + 1} attempts: {type(e).__name__}: {e}"
                ) from e
            log.warning("%s: %s: %s; retrying in %.1fs", what, type(e).__name__, e, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def read_bytes(url: str, endpoint_url: str = "", retries: int = 4, backoff_s: float = 0.5) -> bytes:
    fs, path = filesystem(url, endpoint_url)
    return retry(lambda: fs.cat_file(path), f"reading {url}", retries, backoff_s)


def read_range(
    url: str, start: int, end: int, endpoint_url: str = "", retries: int = 4, backoff_s: float = 0.5
) -> bytes:
    """Bytes ``[start, end)`` of ``url``: one HTTP range request on object stores (a seek on local files)."""
    fs, path = filesystem(url, endpoint_url)
    return retry(
        lambda: fs.cat_file(path, start=start, end=end), f"reading {url} [{start}, {end})", retries, backoff_s
    )


def exists(url: str, endpoint_url: str = "") -> bool:
    fs, path = filesystem(url, endpoint_url)
    return bool(fs.exists(path))


def size(url: str, endpoint_url: str = "") -> int:
    fs, path = filesystem(url, endpoint_url)
    return int(fs.size(path))


def open_read(url: str, endpoint_url: str = "", retries: int = 4, backoff_s: float = 0.5) -> IO[bytes]:
    """A binary stream of ``url``; opening is retried, a missing object raises FileNotFoundError at once."""
    if not is_remote(url):
        return open(url.removeprefix("file://"), "rb")
    fs, path = filesystem(url, endpoint_url)
    return retry(lambda: fs.open(path, "rb", block_size=8 << 20), f"opening {url}", retries, backoff_s)


def download(
    url: str, local_path: str, endpoint_url: str = "", retries: int = 4, backoff_s: float = 0.5
) -> None:
    """Copy ``url`` to ``local_path`` atomically (a temp file beside it, then ``os.replace``)."""
    fs, path = filesystem(url, endpoint_url)
    directory = os.path.dirname(local_path) or "."
    os.makedirs(directory, exist_ok=True)

    def attempt() -> None:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".dl-", suffix=".tmp")
        os.close(fd)
        try:
            fs.get_file(path, tmp)
            os.replace(tmp, local_path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    retry(attempt, f"downloading {url}", retries, backoff_s)


def write_file(local_src: str, url: str, endpoint_url: str = "") -> None:
    """Publish a finished local file at ``url``: ``os.replace`` locally, one upload (atomic PUT) remotely."""
    if not is_remote(url):
        dst = url.removeprefix("file://")
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(local_src, 0o666 & ~umask)  # mkstemp makes 0600; published files are ordinary files
        os.replace(local_src, dst)
        return
    fs, path = filesystem(url, endpoint_url)
    retry(lambda: fs.put_file(local_src, path), f"uploading {url}")
    os.unlink(local_src)


def write_bytes(data: bytes, url: str, endpoint_url: str = "") -> None:
    """Write ``data`` to ``url`` atomically (temp file + rename locally)."""
    directory = os.path.dirname(os.path.abspath(url)) if not is_remote(url) else None
    if directory:
        os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".mmt-", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    write_file(tmp, url, endpoint_url)


def join(base: str, name: str) -> str:
    """``base/name`` for paths and URLs alike."""
    return base.rstrip("/") + "/" + name if base else name


def dirname(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
    if mode != "rb":
        fs, path = filesystem(url)
        return fs.open(path, mode)
    return open_read(url)


def register_gopen() -> None:
    """Let webdataset's ``gopen`` open object-store URLs via fsspec (endpoint from ``AWS_ENDPOINT_URL``)."""
    for scheme in REMOTE_SCHEMES:
        wds.gopen_schemes.setdefault(scheme, _fsspec_gopen)


register_gopen()
