"""Shards built straight to ``s3://`` and loaded back through a real S3 API (moto server): the indexed loader
with its node-local shard cache (also in spawn workers), the webdataset streaming loader, stats, retries."""

from __future__ import annotations

import json
import os

import pytest

from mmt.data import storage
from mmt.data.cli import main as shards_main
from mmt.data.faults import DataError
from mmt.data.loader import build_eval_loader, build_train_loader
from mmt.data.synthetic import write_synthetic_shards
from tests.fixtures_data import data_config, epoch_keys
from tests.fixtures_s3 import moto_s3, s3_bucket  # noqa: F401

N, PER_SHARD = 48, 12
KEYS = [f"sample{i:06d}" for i in range(N)]


@pytest.fixture
def s3_shards(s3_bucket) -> dict:  # noqa: F811
    manifest = write_synthetic_shards(f"{s3_bucket}/train/", N, PER_SHARD)
    return manifest


def test_build_to_s3_writes_shards_sidecars_and_manifest(s3_shards, s3_bucket):  # noqa: F811
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
    keys = sum(epoch_keys(build_train_loader(cfg, 0, 1, 12)), [])
    assert sorted(keys) == KEYS
    cfg = data_config(tmp_path, train_urls=s3_shards["urls"], loader="streaming", num_workers=2)
    keys = sum(epoch_keys(build_train_loader(cfg, 0, 1, 6)), [])
    assert sorted(keys) == KEYS


def test_endpoint_from_config_key(tmp_path, s3_shards, moto_s3, monkeypatch):  # noqa: F811
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


def test_missing_s3_shard_is_named(tmp_path, s3_shards, s3_bucket):  # noqa: F811
    fs, path = storage.filesystem(s3_bucket)
    fs.rm(path + "/train/shard-000002.tar")
    cfg = data_config(tmp_path, train_urls=s3_shards["urls"])
    with pytest.raises(DataError, match=rf"{s3_bucket}/train/shard-000002.tar: shard not found"):
        build_train_loader(cfg, 0, 1, 8)


def test_cli_build_and_stats_on_s3(tmp_path, s3_bucket, capsys):  # noqa: F811
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
