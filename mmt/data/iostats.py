"""What this process fetched from remote storage and how often a reader found its shard already local.

One `IOCounters` per process (`COUNTERS`), like the per-process filesystem cache in `mmt.data.storage`: shard
downloads, range reads and sample reads happen deep inside DataLoader workers, the read-ahead thread and the
catalog scan, and all of them add here. Workers hand their counts back with each batch (`take`), the main
process adds those to its own, and the trainer gathers every rank's totals at logging steps only.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields


@dataclass
class IOCounters:
    bytes_fetched: int = 0  # bytes read from remote storage (whole shards and ranges)
    shard_fetches: int = 0  # whole shards downloaded into the node cache
    range_reads: int = 0  # samples read by HTTP range request (data.remote_read=range)
    cache_hits: int = 0  # samples whose shard was already local when a reader needed it
    cache_misses: int = 0  # samples whose reader had to wait for (or do) the shard's download
    wait_s: float = 0.0  # seconds readers spent waiting for downloads
    fetched: list[str] = field(default_factory=list)  # URLs downloaded whole (drained with `take`)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("lock")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, lock=threading.Lock())

    def add(self, **delta: float | int | str) -> None:
        """Add numbers; ``fetched=url`` appends one URL."""
        with self.lock:
            for k, v in delta.items():
                if k == "fetched":
                    self.fetched.append(str(v))
                else:
                    setattr(self, k, getattr(self, k) + v)

    def merge(self, other: IOCounters) -> None:
        with self.lock:
            for f in fields(self):
                if f.name == "lock":
                    continue
                if f.name == "fetched":
                    self.fetched.extend(other.fetched)
                else:
                    setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def take(self) -> IOCounters:
        """A copy of the counts so far, and zero them (what a worker sends back with a batch)."""
        with self.lock:
            out = IOCounters(**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "lock"})
            for f in fields(self):
                if f.name == "fetched":
                    self.fetched = []
                elif f.name != "lock":
                    setattr(self, f.name, type(getattr(self, f.name))())
        return out

    def numbers(self) -> dict[str, float]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("fetched", "lock")}
        reads = self.cache_hits + self.cache_misses
        d["cache_hit_rate"] = self.cache_hits / reads if reads else 1.0
        return d


COUNTERS = IOCounters()
