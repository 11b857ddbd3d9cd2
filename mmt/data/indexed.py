"""The exact-resume training loader: a map-style dataset over indexed shards, ordered by global batches.

* Epoch order, global (``data.partitions = 0``): a permutation of all samples from (seed, epoch) -- or, with
  ``shard_window = k``, a permutation of shards whose samples are shuffled within consecutive windows of k shards.
* Epoch order, partitioned (``data.partitions = P``): each epoch a seeded permutation deals the shards out to P
  canonical partitions (balanced by sample count); each partition has its own stream (its shards in a seeded
  order, samples shuffled within windows of ``shard_window`` shards), and global batch ``b`` is the concatenation
  over ``p = 0..P-1`` of partition ``p``'s next ``G/P`` samples. The epoch ends with the shortest partition's
  last full batch (the rest of the longer partitions is dropped). Rank ``r`` of ``W`` (``W`` divides ``P``) then
  reads only partitions ``[r*P/W, (r+1)*P/W)``, so each shard is read by one rank (one node) per epoch.
* Global batch ``G``: global batch ``b`` is ``order[start + b*G : start + (b+1)*G]``; rank ``r`` of ``W`` takes
  the ``r``-th ``G/W`` slice. The sequence of global batches does not depend on ``W`` or on the worker count.
* State: ``(epoch, samples_consumed)``. Resuming seeks to that position of the same order -- no sample is
  repeated or skipped, on any world size that divides ``G`` (and ``P``). The last partial global batch of an epoch
  is dropped (the next epoch's permutation differs, so it is not always the same samples).
* Augmentation randomness is seeded per (seed, epoch, sample), so resumed batches are bit-identical too.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmt.data.faults import DataError, FailureTracker
from mmt.data.iostats import COUNTERS, IOCounters
from mmt.data.readahead import ReadAhead, ShardSchedule, rank_schedule
from mmt.data.samples import Collator, SampleDecoder, SampleFailure
from mmt.data.shards import SampleReader, ShardCache, ShardCatalog, StorageSettings

log = logging.getLogger(__name__)
STATE_FORMAT = "mmt-indexed-loader/1"
Item = tuple[int, int, int]  # (epoch, position in the epoch order, global sample index)


def _seed_words(seed: int, *more: int) -> list[int]:
    return [seed & 0xFFFFFFFFFFFFFFFF, *more]


def epoch_order(
    counts: np.ndarray, seed: int, epoch: int, shuffle: bool = True, shard_window: int = 0
) -> np.ndarray:
    """Global sample indices in the order epoch ``epoch`` visits them (a pure function of its arguments)."""
    n = int(counts.sum())
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(_seed_words(seed, epoch))
    if shard_window <= 0:
        return rng.permutation(n).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    shard_perm = rng.permutation(len(counts))
    parts = []
    for g in range(0, len(shard_perm), shard_window):
        window = shard_perm[g : g + shard_window]
        idx = np.concatenate([np.arange(starts[s], starts[s] + counts[s], dtype=np.int64) for s in window])
        rng.shuffle(idx)
        parts.append(idx)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def assign_partitions(
    counts: np.ndarray, partitions: int, rng: np.random.Generator | None
) -> list[np.ndarray]:
    """Deal shards out to ``partitions`` partitions: in a seeded random order, each shard to the partition holding
    the fewest samples so far (largest shards first), so partitions end up with near-equal sample counts even
    when shard sizes differ; each partition's shards are then visited in a seeded random order."""
    n = len(counts)
    perm = rng.permutation(n) if rng is not None else np.arange(n)
    by_size = perm[np.argsort(-counts[perm], kind="stable")]
    loads = np.zeros(partitions, dtype=np.int64)
    parts: list[list[int]] = [[] for _ in range(partitions)]
    for s in by_size:
        p = int(np.argmin(loads))  # the first partition with the smallest load: deterministic ties
        parts[p].append(int(s))
        loads[p] += counts[s]
    out = []
    for shards in parts:
        a = np.array(shards, dtype=np.int64)
        out.append(rng.permutation(a) if rng is not None else np.sort(a))
    return out


def _window_stream(
    shards: np.ndarray, starts: np.ndarray, counts: np.ndarray, rng: np.random.Generator | None, window: int
) -> np.ndarray:
    """Samples of ``shards`` in that order, shuffled within consecutive windows of ``window`` shards (0: all)."""
    window = window if window > 0 else max(1, len(shards))
    parts = []
    for g in range(0, len(shards), window):
        idx = np.concatenate(
            [np.arange(starts[s], starts[s] + counts[s], dtype=np.int64) for s in shards[g : g + window]]
        )
        if rng is not None:
            rng.shuffle(idx)
        parts.append(idx)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def partitioned_order(
    counts: np.ndarray,
    seed: int,
    epoch: int,
    partitions: int,
    per_partition: int,
    shuffle: bool = True,
    shard_window: int = 0,
) -> np.ndarray:
    """The partitioned epoch order (a pure function of its arguments, not of the world size): global batch ``b``
    is ``order[b*G:(b+1)*G]`` = partition 0's next ``per_partition`` samples, then partition 1's, ...

    Its length is ``batches * G`` with ``batches`` = the shortest partition's full batches.
    """
    rng = np.random.default_rng(_seed_words(seed, epoch)) if shuffle else None
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    streams = [
        _window_stream(shards, starts, counts, rng, shard_window)
        for shards in assign_partitions(counts, partitions, rng)
    ]
    batches = min(len(s) for s in streams) // per_partition
    if batches == 0:
        return np.zeros(0, dtype=np.int64)
    k = per_partition
    return np.stack([s[: batches * k].reshape(batches, k) for s in streams], axis=1).reshape(-1)


def valid_world_sizes(partitions: int) -> list[int]:
    """World sizes the partitioned order supports: the divisors of the partition count."""
    return [w for w in range(1, partitions + 1) if partitions % w == 0]


class GlobalBatchSampler:
    """Yields this rank's slice of each remaining global batch of the current epoch (a DataLoader batch_sampler)."""

    def __init__(
        self,
        counts: np.ndarray,
        *,
        seed: int,
        global_batch: int,
        rank: int,
        world_size: int,
        shuffle: bool = True,
        shard_window: int = 0,
        partitions: int = 0,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        if global_batch < world_size or global_batch % world_size:
            raise ValueError(
                f"global batch {global_batch} must be a positive multiple of the world size {world_size}"
            )
        if partitions:
            if global_batch % partitions:
                raise ValueError(f"{partitions} partitions do not divide the global batch {global_batch}")
            if partitions % world_size:
                raise ValueError(f"world size {world_size} does not divide {partitions} partitions")
            if len(counts) < partitions:
                raise ValueError(
                    f"{partitions} partitions need at least as many shards, there are {len(counts)}"
                )
        self.counts, self.seed, self.shuffle, self.shard_window = counts, seed, shuffle, shard_window
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.partitions = partitions
        self.num_samples = int(counts.sum())
        self.epoch = 0
        self.start = 0  # samples of this epoch's order already consumed (by all ranks together)
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            if self.partitions:
                order = partitioned_order(
                    self.counts,
                    self.seed,
                    epoch,
                    self.partitions,
                    self.global_batch // self.partitions,
                    self.shuffle,
                    self.shard_window,
                )
            else:
                order = epoch_order(self.counts, self.seed, epoch, self.shuffle, self.shard_window)
            self._order = (epoch, order)
        return self._order[1]

    def positions(self, epoch: int, start: int) -> np.ndarray:
        """This rank's positions in the epoch order from ``start`` on: shape (batches, G/W)."""
        g, per = self.global_batch, self.global_batch // self.world_size
        n = len(self.order(epoch))
        b0 = np.arange(start, n - g + 1, g, dtype=np.int64)
        return b0[:, None] + self.rank * per + np.arange(per, dtype=np.int64)[None, :]

    def __iter__(self) -> Iterator[list[Item]]:
        epoch, order = self.epoch, self.order(self.epoch)
        for row in self.positions(epoch, self.start):
            yield [(epoch, int(p), int(order[p])) for p in row]

    def __len__(self) -> int:
        return max(0, (len(self.order(self.epoch)) - self.start) // self.global_batch)


class StridedSampler:
    """Evaluation: rank ``r`` reads samples ``r, r + W, ...`` in shard order, in batches of ``batch_size``."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size {batch_size} must be >= 1")
        self.positions = list(range(rank, num_samples, world_size))
        self.batch_size = batch_size
        self.epoch = 0
        self.start = 0

    def __iter__(self) -> Iterator[list[Item]]:
        for i in range(0, len(self.positions), self.batch_size):
            yield [(0, p, p) for p in self.positions[i : i + self.batch_size]]

    def __len__(self) -> int:
        return (len(self.positions) + self.batch_size - 1) // self.batch_size


class SampleRng:
    """The sample's `numpy.random.Generator` (seeded from seed, epoch, sample), made on its first use.

    Why: seeding a generator costs ~15 us, a few percent of a sample's decode, and a decode without random
    augmentation (evaluation, ``crop_scale_min=1``) never draws from it. The draws are the generator's own.
    """

    def __init__(self, words: list[int]) -> None:
        self._words = words
        self._rng: np.random.Generator | None = None

    def __getattr__(
        self, name: str
    ) -> Any:  # only for names not yet on the instance: first use of each method
        if name.startswith("_"):
            raise AttributeError(name)
        if self._rng is None:
            self._rng = np.random.default_rng(self._words)
        value = getattr(self._rng, name)
        setattr(self, name, value)  # later uses skip this lookup
        return value


class IndexedDataset(Dataset):
    """Map-style: ``(epoch, position, global index)`` -> decoded sample, or a `SampleFailure` naming URL and key."""

    def __init__(
        self,
        catalog: ShardCatalog,
        settings: StorageSettings,
        decoder: SampleDecoder,
        seed: int,
        reader: Any = None,
    ) -> None:
        """``reader``: anything with ``read(shard, pos) -> (key, members)`` (default: the shard reader)."""
        self.catalog, self.decoder, self.seed = catalog, decoder, seed
        self.ends = np.cumsum(catalog.counts)
        self.reader = reader if reader is not None else SampleReader(catalog, settings)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def locate(self, index: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.ends, index, side="right"))
        return shard, index - (int(self.ends[shard - 1]) if shard else 0)

    def __getitem__(self, item: Item) -> dict[str, Any] | SampleFailure:
        epoch, _, index = item
        shard, pos = self.locate(index)
        url, key = self.catalog.urls[shard], self.catalog.keys[shard][pos]
        try:
            key, raw = self.reader.read(shard, pos)
            return self.decoder(key, raw, SampleRng(_seed_words(self.seed, epoch, index)))
        except Exception as e:  # any broken sample is skipped and reported, never fatal here
            return SampleFailure(url, key, f"{type(e).__name__}: {e}")


WORKER_PRELOAD = [
    "__main__",
    "torch",
    "numpy",
    "PIL.Image",
    "soundfile",
    "mmt.data.indexed",
    "mmt.data.streaming",
]


def worker_context(start_method: str) -> multiprocessing.context.BaseContext:
    """The workers' multiprocessing context; a forkserver preloads torch and mmt.data so workers start fast."""
    ctx = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(WORKER_PRELOAD)  # only takes effect before the forkserver starts
    return ctx


ENV_PREFIXES = ("AWS_", "MMT_", "GOOGLE_", "AZURE_", "FSSPEC_")


class WorkerInit:
    """Runs first in every worker: one torch thread, and the parent's storage environment as it is *now*.

    A forkserver keeps the environment it started with; copying the credential / endpoint variables here
    makes forkserver workers see what spawn workers would (e.g. credentials set after the forkserver began).
    """

    def __init__(self) -> None:
        self.env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}

    def __call__(self, _: int) -> None:
        os.environ.update(self.env)
        torch.set_num_threads(1)  # decoding is per-sample; threads would only oversubscribe the cores


class IOCollate:
    """The batch collator, plus (in a worker) the I/O counts of that worker since its last batch, so the main
    process can total the node's fetches without any extra channel."""

    def __init__(self, collate: Collator) -> None:
        self.collate = collate

    def __call__(self, samples: list) -> tuple[Any, Any, IOCounters | None]:
        batch, failures = self.collate(samples)
        in_worker = torch.utils.data.get_worker_info() is not None
        return batch, failures, COUNTERS.take() if in_worker else None


@dataclass(frozen=True)
class CacheSettings:
    """How a rank manages its node-local cache in the partitioned order (see `mmt.data.readahead`)."""

    budget: int  # bytes this rank may keep cached (data.cache_max_gb / ranks per node; 0: no cap)
    readahead: int  # shards fetched ahead of the reading
    lookahead: int  # batches readers work on at once (1 + workers x prefetch factor)


@dataclass(frozen=True)
class WorkerSettings:
    num_workers: int = 2
    prefetch_factor: int = 2
    persistent_workers: bool = True
    start_method: str = "forkserver"

    def dataloader_kwargs(self) -> dict[str, Any]:
        """The DataLoader arguments both loaders share: an fsspec-safe start method, persistent prefetching
        workers that each open their own storage clients."""
        nw = self.num_workers
        return dict(
            num_workers=nw,
            multiprocessing_context=worker_context(self.start_method) if nw > 0 else None,
            persistent_workers=self.persistent_workers and nw > 0,
            prefetch_factor=self.prefetch_factor if nw > 0 else None,
            worker_init_fn=WorkerInit() if nw > 0 else None,
            pin_memory=torch.cuda.is_available(),
        )


class IndexedLoader:
    """Iterates the current epoch's remaining batches; ``state_dict`` / ``load_state_dict`` resume exactly.

    ``for batch in loader`` yields this rank's batches from the saved position to the end of the epoch, then
    moves to the next epoch (the next ``for`` starts it). `set_epoch` jumps to an epoch's start, unless it is
    the current epoch (so calling it after `load_state_dict` keeps the resumed position).
    """

    def __init__(
        self,
        dataset: IndexedDataset,
        sampler: GlobalBatchSampler | StridedSampler,
        collate: Collator,
        workers: WorkerSettings,
        tracker: FailureTracker,
        shard_failures: list[tuple[str, str, str]] | None = None,
        cache: CacheSettings | None = None,
    ) -> None:
        self.dataset, self.sampler, self.tracker = dataset, sampler, tracker
        self.shard_failures = list(shard_failures or [])
        self.resumable = isinstance(sampler, GlobalBatchSampler)
        self.cache = cache
        self.io = IOCounters()  # this loader's I/O: its workers' counts and its process's
        self.fetches_by_epoch: dict[int, Counter[str]] = {}  # URL -> downloads, the last two epochs
        self.readahead: ReadAhead | None = None
        self._carried: dict[str, int] = {}
        self._loader = DataLoader(
            dataset, batch_sampler=sampler, collate_fn=IOCollate(collate), **workers.dataloader_kwargs()
        )
        self._started: tuple[int, int, Any] | None = None  # (epoch, start, DataLoader iterator) of `start`

    def start(self) -> None:
        """Start the workers and their first batches now, from the current position, instead of at the first
        ``next``: a trainer that calls this before building its model and engine does not wait for the workers'
        start-up (measured: ~2 s of the demo's first 10 steps, 60 % of their time). Moving the position before
        iterating (`load_state_dict`, `set_epoch`) discards those batches; the workers stay up. Not with the
        read-ahead of remote shards (it plans each epoch's fetches when the epoch starts)."""
        if self._loader.num_workers == 0 or self.cache is not None or self._started is not None:
            return
        with torch.random.fork_rng(devices=[]):  # creating the iterator draws from the global torch RNG
            self._started = (self.sampler.epoch, self.sampler.start, iter(self._loader))

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def num_samples(self) -> int:
        """Samples one epoch visits (the partitioned order drops the longer partitions' ends)."""
        if isinstance(self.sampler, GlobalBatchSampler):
            return len(self.sampler.order(self.sampler.epoch))
        return len(self.dataset)

    def __len__(self) -> int:
        """Batches in a full epoch."""
        if isinstance(self.sampler, GlobalBatchSampler):
            return self.num_samples // self.sampler.global_batch
        return len(self.sampler)

    def schedule(self) -> ShardSchedule:
        """This rank's shards from the current position to the end of the epoch, with first / last batch."""
        s = self.sampler
        if not isinstance(s, GlobalBatchSampler):
            raise TypeError("an evaluation loader has no schedule")
        return rank_schedule(
            s.order(s.epoch),
            s.positions(s.epoch, s.start),
            s.global_batch,
            self.dataset.ends,
            np.asarray(self.dataset.catalog.sizes, dtype=np.int64),
        )

    def _start_readahead(self) -> ReadAhead | None:
        if self.cache is None or not isinstance(self.sampler, GlobalBatchSampler):
            return None
        g = self.sampler.global_batch
        self.readahead = ReadAhead(
            ShardCache(self.dataset.reader.settings),
            self.dataset.catalog.urls,
            self.schedule(),
            budget=self.cache.budget,
            readahead=self.cache.readahead,
            lookahead=self.cache.lookahead,
            consumed=lambda: self.sampler.start // g,
            carried=self._carried,
        )
        return self.readahead.start()

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.sampler.epoch:
            self.sampler.epoch, self.sampler.start = epoch, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        step = self.sampler.global_batch if isinstance(self.sampler, GlobalBatchSampler) else 0
        epoch = self.sampler.epoch
        readahead = self._start_readahead()
        started, self._started = self._started, None
        batches = self._loader
        if started is not None and started[:2] == (epoch, self.sampler.start):
            batches = started[2]
        try:
            for batch, failures, io in batches:
                if io is not None:
                    self.io.merge(io)
                self.tracker.record(len(batch["keys"]) if batch is not None else 0, failures)
                self.sampler.start += step
                if readahead is not None:
                    readahead.wake()
                if batch is None:
                    raise DataError(
                        "every sample of a batch was unreadable: " + "; ".join(map(str, failures[:3]))
                    )
                yield batch
        finally:
            if readahead is not None:
                self._carried = readahead.stop()
            self._collect(epoch)
        self.tracker.check()
        if self.resumable:
            self.sampler.epoch, self.sampler.start = self.sampler.epoch + 1, 0

    def _collect(self, epoch: int) -> None:
        """Fold this process's counts into the loader's and file the downloaded URLs under ``epoch``."""
        self.io.merge(COUNTERS.take())
        log_ = self.fetches_by_epoch.setdefault(epoch, Counter())
        log_.update(self.io.fetched)
        self.io.fetched = []
        for old in [e for e in self.fetches_by_epoch if e < epoch - 1]:
            del self.fetches_by_epoch[old]

    def io_stats(self) -> dict[str, float]:
        """This rank's I/O since the loader was built: bytes fetched, shard fetches, cache hit rate, wait."""
        self._collect(self.sampler.epoch)
        out = self.io.numbers()
        if self.readahead is not None:
            out["cache_peak_bytes"] = self.readahead.peak
            out["cache_evictions"] = self.readahead.evictions
        return out

    def close(self) -> None:
        """Stop the read-ahead of an epoch left unfinished."""
        if self.readahead is not None:
            self._carried = self.readahead.stop()

    def state_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint; identical on every rank."""
        s = self.sampler
        if not isinstance(s, GlobalBatchSampler):
            raise TypeError("an evaluation loader has no resume state")
        return {
            "format": STATE_FORMAT,
            "epoch": s.epoch,
            "samples_consumed": s.start,
            "global_batch": s.global_batch,
            "num_samples": s.num_samples,
            "fingerprint": self.dataset.catalog.fingerprint(),
            "seed": s.seed,
            "shuffle": s.shuffle,
            "shard_window": s.shard_window,
            "partitions": s.partitions,
            "world_size": s.world_size,
            "failures": self.tracker.state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at ``state``'s position; the world size may differ, the data and the order settings may not."""
        s = self.sampler
        if not isinstance(s, GlobalBatchSampler):
            raise TypeError("an evaluation loader has no resume state")
        if state.get("format") != STATE_FORMAT:
            raise DataError(
                f"data loader state has format {state.get('format')!r}, expected {STATE_FORMAT!r}"
            )
        mine = self.state_dict()
        for name in ("fingerprint", "num_samples", "seed", "shuffle", "shard_window", "partitions"):
            if (
                state.get(name, 0) != mine[name]
            ):  # states saved before partitions existed used the global order
                raise DataError(
                    f"the checkpoint's data loader state does not match this data: {name} was {state.get(name)!r}, "
                    f"now {mine[name]!r} (same data.train_urls, data.seed, data.shuffle, data.shard_window, "
                    "data.partitions needed)"
                )
        if state["global_batch"] != s.global_batch and s.partitions:
            # the partitioned order interleaves G/P samples of each partition: another G is another sequence
            raise DataError(
                f"the checkpoint's data loader state was saved with global batch {state['global_batch']}, now "
                f"{s.global_batch}: with data.partitions={s.partitions} the sample order depends on the global "
                "batch (G/P samples of each partition per batch), so resume with the same train.global_batch"
            )
        if state["global_batch"] != s.global_batch:
            log.warning(
                "resuming with global batch %d (saved with %d): the sample sequence continues, batches regroup",
                s.global_batch,
                state["global_batch"],
            )
        s.epoch, s.start = int(state["epoch"]), int(state["samples_consumed"])
        self.tracker.seen = int(state.get("failures", {}).get("seen", 0))
        self.tracker.failed = int(state.get("failures", {}).get("failed", 0))

    def stats(self) -> dict[str, Any]:
        # samples left out of the index when the shard was scanned (hostile members: mmt.data.tarsafety)
        skipped = sum(1 for _, key, _ in self.shard_failures if key == "<sample>")
        return {
            "samples_read": self.tracker.seen + skipped,
            "samples_failed": self.tracker.failed + skipped,
            "shards_failed": len(self.shard_failures) - skipped,
        }
