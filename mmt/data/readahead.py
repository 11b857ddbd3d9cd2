"""The node-local shard cache under a size cap, without thrashing: read ahead in order of first use, evict only
shards this rank has finished with, and refuse a cap smaller than what the shards being read at once need.

The indexed loader knows its whole epoch in advance, so every shard's first and last use (in batches) is known:
`rank_schedule` computes them for this rank. `ReadAhead` is a thread in the rank's main process that downloads
the next shards (this rank's partitions' next windows) while the current ones are read, and deletes a cached
shard only once the loader has yielded the last batch that reads it -- so a shard is fetched at most once per
epoch, whatever the cap, as long as `peak_bytes` fits. Readers (DataLoader workers) that need a shard before it
arrived wait for its download under the cache's per-shard lock instead of fetching it again.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mmt.data.shards import ShardCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSchedule:
    """This rank's shards in order of first use, with the epoch batch indexes of their first and last use."""

    shards: np.ndarray
    first: np.ndarray
    last: np.ndarray
    sizes: np.ndarray


def rank_schedule(
    order: np.ndarray, positions: np.ndarray, global_batch: int, ends: np.ndarray, sizes: np.ndarray
) -> ShardSchedule:
    """The schedule of the samples at ``positions`` (this rank's, shape (batches, G/W)) of the epoch ``order``."""
    if positions.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return ShardSchedule(empty, empty, empty, empty)
    shard = np.searchsorted(ends, order[positions.ravel()], side="right")
    batch = positions.ravel() // global_batch
    first = np.full(len(ends), np.iinfo(np.int64).max, dtype=np.int64)
    last = np.full(len(ends), -1, dtype=np.int64)
    np.minimum.at(first, shard, batch)
    np.maximum.at(last, shard, batch)
    used = np.nonzero(last >= 0)[0]
    used = used[np.lexsort((used, first[used]))]
    return ShardSchedule(used, first[used], last[used], np.asarray(sizes, dtype=np.int64)[used])


def peak_bytes(schedule: ShardSchedule, lookahead: int) -> tuple[int, int]:
    """(bytes, shards) that must be cached at once at the worst batch: a shard is live from ``lookahead - 1``
    batches before its first use (readers work on that many batches at once) to its last use."""
    if len(schedule.shards) == 0:
        return 0, 0
    lo = schedule.first.min()
    begin = np.maximum(schedule.first - (max(1, lookahead) - 1), lo) - lo
    end = schedule.last - lo + 1
    n = int(end.max()) + 1
    nbytes = np.zeros(n + 1, dtype=np.int64)
    count = np.zeros(n + 1, dtype=np.int64)
    np.add.at(nbytes, begin, schedule.sizes)
    np.add.at(nbytes, end, -schedule.sizes)
    np.add.at(count, begin, 1)
    np.add.at(count, end, -1)
    live, shards = np.cumsum(nbytes), np.cumsum(count)
    worst = int(np.argmax(live))
    return int(live[worst]), int(shards[worst])


class ReadAhead:
    """Downloads this rank's shards in order of first use, at most ``readahead`` shards ahead of the reading and
    within ``budget`` bytes (0: no cap); deletes only shards whose last batch has been consumed.

    ``consumed()`` returns the number of this epoch's batches the loader has yielded. ``carried`` are cached
    files (URL -> bytes) left from the previous epoch: evicted first when room is needed, reused when this epoch
    reads them again.
    """

    def __init__(
        self,
        cache: ShardCache,
        urls: list[str],
        schedule: ShardSchedule,
        *,
        budget: int,
        readahead: int,
        lookahead: int,
        consumed: Callable[[], int],
        carried: dict[str, int] | None = None,
    ) -> None:
        self.cache, self.urls, self.schedule = cache, urls, schedule
        self.budget, self.readahead, self.lookahead = budget, max(1, readahead), max(1, lookahead)
        self.consumed = consumed
        last_use = {urls[int(sh)]: int(last) for sh, last in zip(schedule.shards, schedule.last)}
        # cached files from before: kept until their last use in this epoch, evictable at once if not read again
        self.present = {u: (n, last_use.get(u, -1)) for u, n in (carried or {}).items()}
        self.used = sum(n for n, _ in self.present.values())
        self.peak = self.used
        self.evictions = 0
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="mmt-shard-readahead", daemon=True)

    def start(self) -> ReadAhead:
        self._thread.start()
        return self

    def wake(self) -> None:
        """The loader yielded a batch: room may have been freed, the read-ahead window moved."""
        self._wake.set()

    def stop(self) -> dict[str, int]:
        """Stop (after the download in progress) and return the cached files this epoch leaves behind."""
        self._stop = True
        self._wake.set()
        self._thread.join()
        return {u: n for u, (n, _) in self.present.items()}

    def _wait(self) -> None:
        self._wake.wait(0.05)
        self._wake.clear()

    def _run(self) -> None:
        sch = self.schedule
        i, n = 0, len(sch.shards)
        while i < n and not self._stop:
            done = self.consumed()
            started = int(np.searchsorted(sch.first, done, side="right"))  # shards whose reading began
            needed_now = sch.first[i] < done + self.lookahead
            if not needed_now and i - started >= self.readahead:
                self._wait()
                continue
            url, size = self.urls[int(sch.shards[i])], int(sch.sizes[i])
            if url in self.present:  # kept from the last epoch: reuse it
                self.present[url] = (size, int(sch.last[i]))
                i += 1
                continue
            if self.budget and self.used + size > self.budget:
                self._evict(done, self.used + size - self.budget)
                if self.used + size > self.budget:
                    self._wait()  # never delete a shard still to be read: wait for the reading to move on
                    continue
            try:
                self.cache.fetch(url, size)
            except Exception as e:  # noqa: BLE001 - the reader meets the same error and reports the samples
                log.warning("read-ahead of %s failed: %s", url, e)
            else:
                self.present[url] = (size, int(sch.last[i]))
                self.used += size
                self.peak = max(self.peak, self.used)
            i += 1

    def _evict(self, done: int, need: int) -> None:
        """Delete shards whose last use is consumed (oldest last use first) until ``need`` bytes are free."""
        finished = sorted((last, u) for u, (_, last) in self.present.items() if last < done)
        freed = 0
        for _, url in finished:
            if freed >= need:
                break
            size = self.present.pop(url)[0]
            try:
                os.unlink(self.cache.path_for(url))
            except FileNotFoundError:
                pass
            self.used -= size
            freed += size
            self.evictions += 1
