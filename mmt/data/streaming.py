"""The plain streaming loader: webdataset's tar iteration over fsspec streams, for pretraining-style runs.

Shards are split by rank then by worker (``urls[rank::W][worker::num_workers]`` of the epoch's shard order, so
the parts are disjoint and together complete); in ``resampled`` mode every (rank, worker) draws shards with
replacement forever. Several sources mix by weight, sample by sample. Every shuffle is seeded from
(seed, epoch, rank, worker), so an epoch's stream is a pure function of (seed, epoch, rank, world size, workers).

Resume is exact, mid-epoch included, on the same world size and ``data.num_workers``: the state is (epoch, batches
this rank consumed), and a resumed loader replays the epoch's stream up to there and discards it (it re-reads and
re-decodes that part of the epoch once). On another world size or worker count the streams differ and the
position cannot be mapped: `load_state_dict` refuses and names the indexed loader, which resumes anywhere.
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
from mmt.data.shards import StorageSettings
from mmt.data.tarsafety import iter_tar_samples_safe

log = logging.getLogger(__name__)
STATE_FORMAT = "mmt-streaming-loader/2"
EPOCH_ONLY_FORMAT = (
    "mmt-streaming-loader/1"  # older checkpoints: epoch granularity, resumed at the next epoch
)


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
                    for sample in iter_tar_samples_safe(stream, url, s.max_member_bytes):
                        if isinstance(sample, SampleFailure):  # a hostile member: skipped, counted
                            yield sample
                            continue
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
        self.num_workers = workers.num_workers
        self._epoch = 0
        self._consumed = 0  # batches of the current epoch handed out (what a resume skips)
        self._loader = DataLoader(dataset, batch_size=None, **workers.dataloader_kwargs())

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Jump to ``epoch``'s start, unless it is the current epoch (a resumed position is kept)."""
        if epoch != self._epoch:
            self._epoch, self._consumed = epoch, 0
        self.dataset.epoch.value = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch: a resumed loader first replays and drops the batches consumed before."""
        self.dataset.epoch.value = self._epoch
        skip = self._consumed
        for batch, failures in self._loader:
            if batch is None:
                if not skip:
                    self.tracker.record(0, failures)
                continue  # a shard that failed outright at the end of a worker's stream
            if skip:
                skip -= 1  # counted in the failure tracker before the checkpoint
                continue
            self.tracker.record(len(batch["keys"]), failures)
            self._consumed += 1
            yield batch
        self.tracker.check()
        self.set_epoch(self._epoch + 1)

    def __len__(self) -> int:
        raise TypeError("a streaming loader has no length (count steps instead)")

    @property
    def num_samples(self) -> None:
        """Unknown: a stream is not indexed (``train.epochs`` needs ``train.max_steps`` instead)."""
        return None

    def io_stats(self) -> None:
        """Not counted: the workers' streams fetch their shards themselves."""
        return None

    def close(self) -> None:
        """Nothing to release: the workers end with their epoch."""

    def _layout(self) -> dict[str, int]:
        d = self.dataset
        return {"rank": d.rank, "world_size": d.world_size, "num_workers": self.num_workers, "seed": d.seed}

    def state_dict(self) -> dict[str, Any]:
        """This rank's position: (epoch, batches consumed), valid for the same rank layout and worker count."""
        return {
            "format": STATE_FORMAT,
            "epoch": self._epoch,
            "batches_consumed": self._consumed,
            **self._layout(),
            "failures": self.tracker.state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken; refuse a state from another world size or worker count."""
        if state.get("format") == EPOCH_ONLY_FORMAT:
            self.set_epoch(int(state["epoch"]) + 1)
            return
        if state.get("format") != STATE_FORMAT:
            raise DataError(
                f"data loader state has format {state.get('format')!r}, expected {STATE_FORMAT!r}"
            )
        mine = self._layout()
        diff = [f"{k} {state.get(k)!r} -> {v!r}" for k, v in mine.items() if state.get(k) != v]
        if diff:
            raise DataError(
                "data.loader=streaming resumes mid-epoch only on the same rank layout, data.num_workers and seed "
                f"(changed: {', '.join(diff)}): its streams depend on them. Use data.loader=indexed (the default), "
                "which resumes the exact sample sequence on any world size"
            )
        self._epoch, self._consumed = int(state["epoch"]), int(state["batches_consumed"])
        self.dataset.epoch.value = self._epoch
        self.tracker.seen = int(state.get("failures", {}).get("seen", 0))
        self.tracker.failed = int(state.get("failures", {}).get("failed", 0))

    def stats(self) -> dict[str, Any]:
        return {"samples_read": self.tracker.seen, "samples_failed": self.tracker.failed}
