"""The factories the trainer calls: `build_train_loader` and `build_eval_loader`.

Both read every knob from the typed config (``data.*``, the model's input shapes from ``model.*``, the task from
``train.task``) and yield batch dicts in the shared contract (see `mmt.data.samples`).

Typical use::

    loader = build_train_loader(cfg, rank, world_size, global_batch=64)
    if resuming:
        loader.load_state_dict(client_state["data"])       # also fine on another world size
    while step < max_steps:
        for batch in loader:                                # this rank's batches, rest of the current epoch
            ...; step += 1
            client_state["data"] = loader.state_dict()     # same on every rank
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from mmt.config import ConfigError
from mmt.config.root import Config
from mmt.data import storage
from mmt.data.annotations import AnnotationCatalog, AnnotationReader
from mmt.data.codec import SOURCE, build_codec, train_sources
from mmt.data.faults import DataError, FailureTracker
from mmt.data.indexed import (
    CacheSettings,
    GlobalBatchSampler,
    IndexedDataset,
    IndexedLoader,
    StridedSampler,
    WorkerSettings,
    valid_world_sizes,
)
from mmt.data.protocol import TrainLoader
from mmt.data.readahead import peak_bytes
from mmt.data.shards import ShardCatalog, StorageSettings, default_cache_dir
from mmt.data.streaming import StreamingDataset, StreamingLoader


def data_seed(cfg: Config) -> int:
    return cfg.data.seed if cfg.data.seed is not None else cfg.train.seed


def storage_settings(cfg: Config) -> StorageSettings:
    d = cfg.data
    return StorageSettings(
        cache_dir=d.cache_dir or default_cache_dir(),
        endpoint_url=storage.resolve_endpoint(d.endpoint_url),
        retries=d.retries,
        backoff_s=d.retry_backoff_s,
        cache_max_bytes=int(d.cache_max_gb * 1e9),
        remote_read=d.remote_read,
        max_member_bytes=int(d.max_member_mb * 2**20),
    )


def worker_settings(cfg: Config) -> WorkerSettings:
    d = cfg.data
    return WorkerSettings(d.num_workers, d.prefetch_factor, d.persistent_workers, d.start_method)


def _catalog(urls: list[str], cfg: Config, settings: StorageSettings, key: str) -> ShardCatalog:
    if not urls:
        raise ConfigError(SOURCE, key, "no shards")
    os.makedirs(settings.cache_dir, exist_ok=True)
    catalog = ShardCatalog.open(urls, settings)
    failed = catalog.num_requested - len(catalog.urls)
    if not catalog.urls or failed / catalog.num_requested > cfg.data.max_failure_fraction:
        details = "; ".join(f"{u}: {e}" for u, k, e in catalog.failures if k == "<shard>")
        raise DataError(
            f"{failed} of {catalog.num_requested} shards of {key} unreadable, more than "
            f"data.max_failure_fraction={cfg.data.max_failure_fraction}: {details}"
        )
    if catalog.num_samples == 0:
        raise DataError(f"the shards of {key} hold no samples: {urls[:3]}...")
    return catalog


def _catalog_and_reader(urls: list[str], cfg: Config, settings: StorageSettings, key: str) -> tuple[Any, Any]:
    """The shard catalog (reader made by the dataset), or for ``data.format=annotations`` the annotation file's."""
    if cfg.data.format != "annotations":
        return _catalog(urls, cfg, settings, key), None
    if len(urls) != 1:
        raise ConfigError(SOURCE, key, f"data.format=annotations takes one annotation file, got {len(urls)}")
    try:
        catalog = AnnotationCatalog.open(urls[0], cfg.data.media_root)
    except ValueError as e:
        raise ConfigError(SOURCE, key, str(e)) from None
    if catalog.num_samples == 0:
        raise DataError(f"the annotation file of {key} holds no samples: {urls[0]}")
    return catalog, AnnotationReader(catalog, "auto")


def _tracker(cfg: Config) -> FailureTracker:
    return FailureTracker(cfg.data.max_failure_fraction, cfg.data.failure_check_after)


def build_train_loader(cfg: Config, rank: int, world_size: int, global_batch: int) -> TrainLoader:
    """This rank's training loader.

    ``global_batch`` is the number of samples per optimizer step over all ranks (must divide by
    ``world_size``); each rank's batches hold ``global_batch // world_size`` samples (fewer only where samples
    were unreadable). ``data.loader`` picks the exact-resume indexed loader (default) or the webdataset
    streaming one. The returned loader has ``set_epoch``, ``state_dict``, ``load_state_dict`` and ``stats``; an
    indexed loader with workers has started them on its first batches already (`IndexedLoader.start`).
    """
    if global_batch % world_size:
        raise ConfigError(
            SOURCE, "global batch", f"{global_batch} is not a multiple of the world size {world_size}"
        )
    settings = storage_settings(cfg)
    decoder, collate = build_codec(cfg, True, settings)
    sources = train_sources(cfg)
    seed = data_seed(cfg)
    if cfg.data.loader == "streaming":
        if cfg.data.format == "annotations":
            raise ConfigError(SOURCE, "data.format", "annotations are read by data.loader=indexed only")
        dataset = StreamingDataset(
            sources,
            rank=rank,
            world_size=world_size,
            batch_size=global_batch // world_size,
            decoder=decoder,
            collate=collate,
            settings=settings,
            seed=seed,
            shuffle=cfg.data.shuffle,
            shuffle_buffer=cfg.data.shuffle_buffer,
            resampled=cfg.data.resampled,
            partial=False,
            start_method=cfg.data.start_method,
        )
        return StreamingLoader(dataset, worker_settings(cfg), _tracker(cfg))
    if any(s.weight != sources[0].weight for s in sources):
        raise ConfigError(SOURCE, "data.sources", "weights other than equal need data.loader=streaming")
    if cfg.data.resampled:
        raise ConfigError(SOURCE, "data.resampled", "resampled mode needs data.loader=streaming")
    urls = [u for s in sources for u in s.urls]
    _check_partitions(cfg.data.partitions, global_batch, world_size)
    catalog, reader = _catalog_and_reader(urls, cfg, settings, "data.train_urls")
    if cfg.data.partitions > len(catalog.urls):
        raise ConfigError(
            SOURCE,
            "data.partitions",
            f"{cfg.data.partitions} partitions need at least as many shards; data.train_urls has "
            f"{len(catalog.urls)} readable shards",
        )
    sampler = GlobalBatchSampler(
        catalog.counts,
        seed=seed,
        global_batch=global_batch,
        rank=rank,
        world_size=world_size,
        shuffle=cfg.data.shuffle,
        shard_window=cfg.data.shard_window,
        partitions=cfg.data.partitions,
    )
    if len(sampler) == 0:
        raise DataError(
            f"{catalog.num_samples} training samples do not fill one global batch of {global_batch}"
            + (f" in each of data.partitions={cfg.data.partitions}" if cfg.data.partitions else "")
        )
    cache = _cache_settings(cfg, catalog, world_size)
    if cache is not None:  # the read-ahead thread alone evicts: readers must not
        settings = dataclasses.replace(settings, cache_max_bytes=0)
    dataset = IndexedDataset(catalog, settings, decoder, seed, reader=reader)
    loader = IndexedLoader(
        dataset, sampler, collate, worker_settings(cfg), _tracker(cfg), catalog.failures, cache
    )
    _check_cache_size(cfg, loader, cache)
    loader.start()  # workers decode the first batches while the caller sets up its model
    return loader


def _check_partitions(partitions: int, global_batch: int, world_size: int) -> None:
    if not partitions:
        return
    if global_batch % partitions:
        divisors = [p for p in range(1, global_batch + 1) if global_batch % p == 0]
        raise ConfigError(
            SOURCE,
            "data.partitions",
            f"{partitions} does not divide the global batch {global_batch} (train.global_batch); "
            f"divisors: {', '.join(map(str, divisors))}",
        )
    if partitions % world_size:
        valid = ", ".join(map(str, valid_world_sizes(partitions)))
        raise ConfigError(
            SOURCE,
            "data.partitions",
            f"world size {world_size} does not divide data.partitions={partitions}: valid world sizes are "
            f"{valid} (or set data.partitions to a multiple of {world_size})",
        )


def _ranks_per_node() -> int:
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _lookahead(cfg: Config) -> int:
    """Batches readers work on at once: the one being consumed plus every worker's prefetched ones."""
    return 1 + cfg.data.num_workers * cfg.data.prefetch_factor


def _cache_settings(cfg: Config, catalog: ShardCatalog, world_size: int) -> CacheSettings | None:
    """Read-ahead and consumption-aware eviction: for the partitioned order over remote shards fetched whole."""
    d = cfg.data
    if not d.partitions or d.remote_read != "shard" or not any(storage.is_remote(u) for u in catalog.urls):
        return None
    mine = d.partitions // world_size
    readahead = d.readahead_shards or mine * max(1, d.shard_window)
    return CacheSettings(int(d.cache_max_gb * 1e9) // _ranks_per_node(), readahead, _lookahead(cfg))


def _check_cache_size(cfg: Config, loader: IndexedLoader, cache: CacheSettings | None) -> None:
    """Refuse a cache cap below what the shards read at once need (it would refetch shards: thrash)."""
    d = cfg.data
    catalog = loader.dataset.catalog
    if d.cache_max_gb <= 0 or d.remote_read != "shard" or not any(storage.is_remote(u) for u in catalog.urls):
        return
    budget = cache.budget if cache is not None else int(d.cache_max_gb * 1e9)
    need, shards = peak_bytes(loader.schedule(), _lookahead(cfg))
    if need > budget:
        per_node = need * (_ranks_per_node() if cache is not None else 1)
        raise ConfigError(
            SOURCE,
            "data.cache_max_gb",
            f"{d.cache_max_gb:g} GB cannot hold the {shards} shards this node reads at once: at least "
            f"{per_node / 1e9:.4g} GB needed (data.shard_window={d.shard_window}, data.partitions={d.partitions}, "
            f"data.num_workers={d.num_workers}); raise it, or lower data.shard_window / data.num_workers",
        )


def build_eval_loader(cfg: Config, rank: int, world_size: int, batch_size: int) -> IndexedLoader:
    """This rank's part of ``data.val_urls``: samples ``rank, rank + world_size, ...`` in order, no augmentation,
    batches of ``batch_size`` (the last may be smaller); every sample is seen once over all ranks.

    Ranks may get different numbers of batches (by at most one) when the sample count does not divide: gather
    results with that in mind (or evaluate on rank 0 with ``world_size=1``). Iterating again restarts from the
    first sample.
    """
    if not cfg.data.val_urls:
        raise ConfigError(SOURCE, "data.val_urls", "no evaluation shards")
    settings = storage_settings(cfg)
    decoder, collate = build_codec(cfg, False, settings)
    catalog, reader = _catalog_and_reader(storage.expand(cfg.data.val_urls), cfg, settings, "data.val_urls")
    sampler = StridedSampler(catalog.num_samples, batch_size, rank, world_size)
    dataset = IndexedDataset(catalog, settings, decoder, data_seed(cfg), reader=reader)
    return IndexedLoader(dataset, sampler, collate, worker_settings(cfg), _tracker(cfg), catalog.failures)
