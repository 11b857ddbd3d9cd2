"""The exact-resume training loader: a map-style dataset over indexed shards, ordered by global batches.

* Epoch order: a permutation of all samples from (seed, epoch) -- or, with ``shard_window = k``, a permutation of
  shards whose samples are shuffled within consecutive windows of k shards (locality for object stores).
* Global batch ``G``: global batch ``b`` is ``order[start + b*G : start + (b+1)*G]``; rank ``r`` of ``W`` takes
  the ``r``-th ``G/W`` slice. The sequence of global batches does not depend on ``W`` or on the worker count.
* State: ``(epoch, samples_consumed)``. Resuming seeks to that position of the same order -- no sample is
  repeated or skipped, on any world size that divides ``G``. The last partial global batch of an epoch is
  dropped (the next epoch's permutation differs, so it is not always the same samples).
* Augmentation randomness is seeded per (seed, epoch, sample), so resumed batches are bit-identical too.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmt.data.faults import DataError, FailureTracker
from mmt.data.samples import Collator, SampleDecoder, SampleFailure
from mmt.data.shards import SampleReader, ShardCatalog, StorageSettings

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
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        if global_batch < world_size or global_batch % world_size:
            raise ValueError(
                f"global batch {global_batch} must be a positive multiple of the world size {world_size}"
            )
        self.counts, self.seed, self.shuffle, self.shard_window = counts, seed, shuffle, shard_window
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.num_samples = int(counts.sum())
        self.epoch = 0
        self.start = 0  # samples of this epoch's order already consumed (by all ranks together)
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.counts, self.seed, epoch, self.shuffle, self.shard_window))
        return self._order[1]

    def __iter__(self) -> Iterator[list[Item]]:
        epoch, order, g = self.epoch, self.order(self.epoch), self.global_batch
        per = g // self.world_size
        for b0 in range(self.start, self.num_samples - g + 1, g):
            lo = b0 + self.rank * per
            yield [(epoch, p, int(order[p])) for p in range(lo, lo + per)]

    def __len__(self) -> int:
        return max(0, (self.num_samples - self.start) // self.global_batch)


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


class IndexedDataset(Dataset):
    """Map-style: ``(epoch, position, global index)`` -> decoded sample, or a `SampleFailure` naming URL and key."""

    def __init__(
        self, catalog: ShardCatalog, settings: StorageSettings, decoder: SampleDecoder, seed: int
    ) -> None:
        self.catalog, self.decoder, self.seed = catalog, decoder, seed
        self.ends = np.cumsum(catalog.counts)
        self.reader = SampleReader(catalog, settings)

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
            rng = np.random.default_rng(_seed_words(self.seed, epoch, index))
            return self.decoder(key, raw, rng)
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
    ) -> None:
        self.dataset, self.sampler, self.tracker = dataset, sampler, tracker
        self.shard_failures = list(shard_failures or [])
        self.resumable = isinstance(sampler, GlobalBatchSampler)
        self._loader = DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate, **workers.dataloader_kwargs()
        )

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def __len__(self) -> int:
        """Batches in a full epoch."""
        if isinstance(self.sampler, GlobalBatchSampler):
            return self.sampler.num_samples // self.sampler.global_batch
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.sampler.epoch:
            self.sampler.epoch, self.sampler.start = epoch, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        step = self.sampler.global_batch if isinstance(self.sampler, GlobalBatchSampler) else 0
        for batch, failures in self._loader:
            self.tracker.record(len(batch["keys"]) if batch is not None else 0, failures)
            self.sampler.start += step
            if batch is None:
                raise DataError(
                    "every sample of a batch was unreadable: " + "; ".join(map(str, failures[:3]))
                )
            yield batch
        self.tracker.check()
        if self.resumable:
            self.sampler.epoch, self.sampler.start = self.sampler.epoch + 1, 0

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
        for name in ("fingerprint", "num_samples", "seed", "shuffle", "shard_window"):
            if state[name] != mine[name]:
                raise DataError(
                    f"the checkpoint's data loader state does not match this data: {name} was {state[name]!r}, "
                    f"now {mine[name]!r} (same data.train_urls, data.seed, data.shuffle, data.shard_window needed)"
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
        return {
            "samples_read": self.tracker.seen,
            "samples_failed": self.tracker.failed,
            "shards_failed": len(self.shard_failures),
        }
