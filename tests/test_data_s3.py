"""Shards built straight to ``s3://`` and loaded back through a real S3 API (moto server): the indexed loader
with its node-local shard cache (also in spawn workers), the webdataset streaming loader, stats, retries."""

from __future__ import annotations

import json
import os

import pytest
import torch

from mmt.config import ConfigError
from mmt.data import storage
from mmt.data.cli import main as shards_main
from mmt.data.faults import DataError
from mmt.data.loader import build_eval_loader, build_train_loader
from mmt.data.synthetic import write_synthetic_shards
from mmt.training.distributed import DistEnv
from mmt.training.telemetry import NodeMeter
from tests.fixtures_data import data_config, epoch_keys

N, PER_SHARD = 48, 12
KEYS = [f"sample{i:06d}" for i in range(N)]


@pytest.fixture
def s3_shards(s3_bucket) -> dict:
    manifest = write_synthetic_shards(f"{s3_bucket}/train/", N, PER_SHARD)
    return manifest


def test_build_to_s3_writes_shards_sidecars_and_manifest(s3_shards, s3_bucket):
    assert s3_shards["urls"] == f"{s3_bucket}/train/shard-{{000000..000003}}.tar"
    fs, path = storage.filesystem(s3_bucket)
    names = sorted(os.path.basename(p) for p in fs.ls(path + "/train", refresh=True))
    assert names == ["answers.json", "manifest.json"] + sorted(
        [f"shard-{i:06d}.tar" for i in range(4)] + [f"shard-{i:06d}.tar.idx.json" for i in range(4)]
    )
    manifest = json.loads(storage.read_bytes(f"{s3_bucket}/train/manifest.json"))
    assert manifest["num_samples"] == N and [s["samples"] for s in manifest["shards"]] == [PER_SHARD] * 4


def test_indexed_loader_from_s3_with_resume(tmp_path, s3_shards):
    cfg = data_config(tmp_path, train_urls=s3_shards["urls"])
    full = [epoch_keys(build_train_loader(cfg, r, 2, 8)) for r in range(2)]
    assert sorted(k for rank in full for b in rank for k in b) == KEYS
    cached = os.listdir(tmp_path / "cache" / "shards")
    assert (
        len([c for c in cached if c.endswith(".tar")]) == 4
    )  # whole shards fetched once into the node cache
    first = build_train_loader(cfg, 0, 2, 8)
    head = epoch_keys(first, limit=2)
    resumed = build_train_loader(cfg, 0, 1, 8)
    resumed.load_state_dict(first.state_dict())
    tail = epoch_keys(resumed)
    assert len(tail) == len(full[0]) - 2
    assert [full[0][b] + full[1][b] for b in range(2, len(full[0]))] == tail
    assert head == full[0][:2]


def test_workers_read_s3(tmp_path, s3_shards):
    """2 forkserver workers, each creating its own S3 filesystem lazily (s3fs is not fork-safe); they get the
    credentials of the parent even if the forkserver started before the variables were set."""
    cfg = data_config(tmp_path, train_urls=s3_shards["urls"], num_workers=2)
    loader = build_train_loader(cfg, 0, 1, 12)
    keys = sum(epoch_keys(loader), [])
    assert sorted(keys) == KEYS
    io = loader.io_stats()  # the workers' counts came back with the batches
    assert io["shard_fetches"] == 4 and io["cache_hits"] + io["cache_misses"] == N
    assert io["bytes_fetched"] == sum(loader.dataset.catalog.sizes)
    cfg = data_config(tmp_path, train_urls=s3_shards["urls"], loader="streaming", num_workers=2)
    keys = sum(epoch_keys(build_train_loader(cfg, 0, 1, 6)), [])
    assert sorted(keys) == KEYS


def test_endpoint_from_config_key(tmp_path, s3_shards, moto_s3, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    cfg = data_config(
        tmp_path, val_urls=s3_shards["urls"], train_urls=s3_shards["urls"], endpoint_url=moto_s3
    )
    keys = sum(epoch_keys(build_eval_loader(cfg, 0, 1, 16)), [])
    assert keys == KEYS


def test_streaming_loader_from_s3(tmp_path, s3_shards):
    cfg = data_config(tmp_path, train_urls=s3_shards["urls"], loader="streaming", shuffle_buffer=10)
    keys = sum(epoch_keys(build_train_loader(cfg, 0, 1, 6)), [])
    assert sorted(keys) == KEYS


def test_missing_s3_shard_is_named(tmp_path, s3_shards, s3_bucket):
    fs, path = storage.filesystem(s3_bucket)
    fs.rm(path + "/train/shard-000002.tar")
    cfg = data_config(tmp_path, train_urls=s3_shards["urls"])
    with pytest.raises(DataError, match=rf"{s3_bucket}/train/shard-000002.tar: shard not found"):
        build_train_loader(cfg, 0, 1, 8)


def test_cli_build_and_stats_on_s3(tmp_path, s3_bucket, capsys):
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 10), (i * 50, 0, 0)).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"red level {i}")
    assert shards_main(["build", str(folder), f"{s3_bucket}/cli/", "--quiet", "--reencode"]) == 0
    capsys.readouterr()
    assert shards_main(["stats", f"{s3_bucket}/cli/shard-000000.tar", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["samples"] == 3 and stats["extensions"] == {"jpg": 3, "json": 3, "txt": 3}


def test_retry_backs_off_then_succeeds_or_names_the_url():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection reset")
        return "ok"

    assert storage.retry(flaky, "reading s3://b/k", retries=3, backoff_s=0.01) == "ok" and len(calls) == 3
    with pytest.raises(storage.StorageError, match="reading s3://b/k: failed after 2 attempts"):
        storage.retry(lambda: (_ for _ in ()).throw(TimeoutError("slow")), "reading s3://b/k", 1, 0.01)


def test_cache_size_limit_with_shard_window(tmp_path, s3_shards):
    """shard_window=1 reads one shard at a time; the node cache keeps at most ~2 shards (LRU eviction)."""
    one_shard = 120_000  # a shard of 12 synthetic samples is ~113 kB
    cfg = data_config(
        tmp_path, train_urls=s3_shards["urls"], shard_window=1, cache_max_gb=2 * one_shard / 1e9
    )
    batches = epoch_keys(build_train_loader(cfg, 0, 1, 6))
    assert sorted(sum(batches, [])) == KEYS
    shard_of = [{int(k.removeprefix("sample")) // PER_SHARD for k in b} for b in batches]
    assert all(len(s) == 1 for s in shard_of)  # 12 samples per shard, 6 per batch: one shard per batch
    cache = tmp_path / "cache" / "shards"
    sizes = [p.stat().st_size for p in cache.iterdir() if p.suffix == ".tar"]
    assert max(sizes) < one_shard and sum(sizes) <= 2 * one_shard and len(sizes) <= 2


@pytest.fixture
def s3_eight_shards(s3_bucket) -> dict:
    return write_synthetic_shards(f"{s3_bucket}/eight/", N, 6)


def test_two_nodes_fetch_each_shard_once_per_epoch_under_a_small_cache(tmp_path, s3_eight_shards):
    """4 partitions on 2 ranks, each rank a node with its own cache capped at 3 shards (it reads 2 at once): over
    two epochs every shard is downloaded by exactly one of them per epoch, read ahead, evicted only after its
    last read; a cap below the 2 shards read at once is refused with the minimum."""
    urls = s3_eight_shards["urls"]
    sizes = build_train_loader(data_config(tmp_path, train_urls=urls), 0, 1, 8).dataset.catalog.sizes
    cap = 3 * max(sizes)
    loaders = [
        build_train_loader(
            data_config(
                tmp_path / f"node{r}", train_urls=urls, partitions=4, shard_window=1, cache_max_gb=cap / 1e9
            ),
            r,
            2,
            8,
        )
        for r in range(2)
    ]
    all_shards = {f"{urls.split('{')[0]}{i:06d}.tar" for i in range(8)}
    for epoch in range(2):
        per_rank = [epoch_keys(ld) for ld in loaders]
        assert sorted(k for rank in per_rank for b in rank for k in b) == KEYS
        read = [
            {urls.split("{")[0] + f"{int(k[6:]) // 6:06d}.tar" for b in rank for k in b} for rank in per_rank
        ]
        assert read[0] | read[1] == all_shards and not read[0] & read[1]  # each shard read on one node
        fetched = [ld.fetches_by_epoch[epoch] for ld in loaders]
        assert all(n == 1 for f in fetched for n in f.values())  # never twice in an epoch: no thrash
        assert all(set(f) <= r for f, r in zip(fetched, read))
        if epoch == 0:
            assert [set(f) for f in fetched] == read  # the first epoch starts with empty caches
    for r, ld in enumerate(loaders):
        io = ld.io_stats()
        assert io["cache_peak_bytes"] <= cap and io["cache_evictions"] > 0
        assert io["bytes_fetched"] <= sum(sizes)  # half of the data per epoch, not all of it
        # what the trainer logs for this node (rank r is node r here: one rank per node)
        node = NodeMeter(DistEnv(r, 2, 0, 1, "env", "", 0)).reduce(ld)
        assert node[f"node{r}/data_fetched_gb"] == io["bytes_fetched"] / 1e9
        assert node[f"node{r}/data_shard_fetches"] == io["shard_fetches"] and node[f"node{r}/rss_gb"] > 0
        assert node[f"node{r}/data_cache_hit_rate"] == io["cache_hit_rate"]
    small = data_config(
        tmp_path, train_urls=urls, partitions=4, shard_window=1, cache_max_gb=max(sizes) / 1e9
    )
    with pytest.raises(
        ConfigError, match=r"data.cache_max_gb: .* cannot hold the 2 shards this node reads at once"
    ):
        build_train_loader(small, 0, 2, 8)
    full_permutation = data_config(tmp_path, train_urls=urls, cache_max_gb=cap / 1e9)
    with pytest.raises(ConfigError, match=r"cannot hold the 8 shards"):  # would refetch a shard per sample
        build_train_loader(full_permutation, 0, 1, 8)


def test_range_reads_equal_whole_shard_reads(tmp_path, s3_shards):
    """data.remote_read=range: one ranged GET per sample, the same decoded batches, no shard downloaded."""
    out = {}
    for mode in ("shard", "range"):
        cfg = data_config(tmp_path / mode, train_urls=s3_shards["urls"], remote_read=mode)
        loader = build_train_loader(cfg, 0, 1, 8)
        out[mode] = (list(loader), loader.io_stats(), loader.dataset.catalog)
    (shard_batches, shard_io, catalog), (range_batches, range_io, _) = out["shard"], out["range"]
    assert [b["keys"] for b in shard_batches] == [b["keys"] for b in range_batches]
    for a, b in zip(shard_batches, range_batches):
        for name in ("image_features", "audio_features", "text_inputs"):
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert range_io["shard_fetches"] == 0 and range_io["range_reads"] == N
    assert range_io["bytes_fetched"] == sum(int((sp[:, 1] - sp[:, 0]).sum()) for sp in catalog.spans)
    assert shard_io["shard_fetches"] == 4 and shard_io["bytes_fetched"] == sum(catalog.sizes)
    assert not (tmp_path / "range" / "cache" / "shards").exists()
