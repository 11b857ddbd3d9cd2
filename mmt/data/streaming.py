"""The plain streaming loader: webdataset's tar iteration over fsspec streams, for pretraining-style runs.

Shards are split by rank then by worker (``urls[rank::W][worker::num_workers]`` of the epoch's shard order, so
the parts are disjoint and together complete); in ``resampled`` mode every (rank, worker) draws shards with
replacement forever. Several sources mix by weight, sample by sample. Every shuffle is seeded from
(seed, epoch, rank, worker). Resume is at epoch granularity: `load_state_dict` continues with the next epoch's
fresh order (use the indexed loader where exact resume matters).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmt.data import storage
from mmt.data.faults import DataError, FailureTracker
from mmt.data.indexed import WorkerSettings, worker_context
from mmt.data.samples import Collator, SampleDecoder, SampleFailure
from mmt.data.shards import StorageSettings, iter_tar_samples

log = logging.getLogger(__name__)
STATE_FORMAT = "mmt-streaming-loader/1"


def split_shards(urls: list[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """This (rank, worker)'s shards: disjoint across all ranks x workers, and together all of ``urls``."""
    return urls[rank::world_size][worker::num_workers]


@dataclass
class Source:
    urls: list[str]
    weight: float = 1.0


class StreamingDataset(IterableDataset):
    """Yields batches ``(batch, failures)``; built once, iterated once per epoch in every worker."""

    def __init__(
        self,
        sources: list[Source],
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        decoder: SampleDecoder,
        collate: Collator,
        settings: StorageSettings,
        seed: int,
        shuffle: bool,
        shuffle_buffer: int,
        resampled: bool,
        partial: bool,
        start_method: str = "forkserver",
    ) -> None:
        super().__init__()
        self.sources, self.rank, self.world_size, self.batch_size = sources, rank, world_size, batch_size
        self.decoder, self.collate, self.settings = decoder, collate, settings
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.resampled, self.partial = resampled, partial
        self.epoch = worker_context(start_method).Value("i", 0)  # shared with persistent workers

    def _rng(self, *more: int) -> random.Random:
        info = get_worker_info()
        worker = info.id if info else 0
        return random.Random(
            f"{self.seed}/{self.epoch.value}/{self.rank}/{worker}/" + "/".join(map(str, more))
        )

    def _shards(self, source: Source, which: int) -> Iterator[str]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self.resampled:
            rng = self._rng(which, 1)
            while True:
                yield source.urls[rng.randrange(len(source.urls))]
        urls = list(source.urls)
        if self.shuffle:
            random.Random(f"{self.seed}/{self.epoch.value}/shards/{which}").shuffle(
                urls
            )  # same on every rank
        yield from split_shards(urls, self.rank, self.world_size, worker, workers)

    def _samples(self, source: Source, which: int) -> Iterator[dict[str, Any] | SampleFailure]:
        s = self.settings
        for url in self._shards(source, which):
            last = "<start of shard>"
            try:
                stream = storage.open_read(url, s.endpoint_url, s.retries, s.backoff_s)
                with stream:
                    for sample in iter_tar_samples(stream, url):
                        last = sample["__key__"]
                        yield sample
            except Exception as e:  # an unreadable shard ends that shard only
                yield SampleFailure(url, f"after {last}", f"{type(e).__name__}: {e}")

    def _mixed(self) -> Iterator[dict[str, Any] | SampleFailure]:
        streams = [self._samples(src, i) for i, src in enumerate(self.sources)]
        if len(streams) == 1:
            yield from streams[0]
            return
        weights = [src.weight for src in self.sources]
        rng = self._rng(0, 2)
        live = list(range(len(streams)))
        while live:
            i = rng.choices(live, weights=[weights[j] for j in live])[0]
            try:
                yield next(streams[i])
            except StopIteration:
                live.remove(i)

    def _shuffled(self, items: Iterator[Any]) -> Iterator[Any]:
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from items
            return
        rng, buf = self._rng(0, 3), []
        for item in items:
            if len(buf) < self.shuffle_buffer:
                buf.append(item)
                continue
            j = rng.randrange(len(buf))
            yield buf[j]
            buf[j] = item
        rng.shuffle(buf)
        yield from buf

    def _decoded(self, items: Iterator[Any]) -> Iterator[dict[str, Any] | SampleFailure]:
        info = get_worker_info()
        worker = info.id if info else 0
        for i, item in enumerate(items):
            if isinstance(item, SampleFailure):
                yield item
                continue
            key, url = item["__key__"], item["__url__"]
            raw = {k: v for k, v in item.items() if not k.startswith("__")}
            try:
                rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch.value, self.rank, worker, i])
                yield self.decoder(key, raw, rng)
            except Exception as e:
                yield SampleFailure(url, key, f"{type(e).__name__}: {e}")

    def __iter__(self) -> Iterator[tuple[dict[str, Any] | None, list[SampleFailure]]]:
        batch: list[Any] = []
        n_ok = 0
        for item in self._decoded(self._shuffled(self._mixed())):
            batch.append(item)
            n_ok += not isinstance(item, SampleFailure)
            if n_ok == self.batch_size:
                yield self.collate(batch)
                batch, n_ok = [], 0
        if batch and (self.partial or n_ok == 0):
            yield self.collate(batch)


class StreamingLoader:
    """Batches from `StreamingDataset` through a DataLoader; counts failures; epoch-level state."""

    def __init__(self, dataset: StreamingDataset, workers: WorkerSettings, tracker: FailureTracker) -> None:
        self.dataset, self.tracker = dataset, tracker
        self._epoch = 0
        self._loader = DataLoader(dataset, batch_size=None, **workers.dataloader_kwargs())

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self.dataset.epoch.value = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.dataset.epoch.value = self._epoch
        for batch, failures in self._loader:
            self.tracker.record(len(batch["keys"]) if batch is not None else 0, failures)
            if batch is None:
                continue  # a shard that failed outright at the end of a worker's stream
            yield batch
        self.tracker.check()
        self.set_epoch(self._epoch + 1)

    def __len__(self) -> int:
        raise TypeError("a streaming loader has no length (count steps instead)")

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "epoch": self._epoch, "failures": self.tracker.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise DataError(
                f"data loader state has format {state.get('format')!r}, expected {STATE_FORMAT!r}"
            )
        self.set_epoch(int(state["epoch"]) + 1)

    def stats(self) -> dict[str, Any]:
        return {"samples_read": self.tracker.seen, "samples_failed": self.tracker.failed}
