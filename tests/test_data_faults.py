"""Broken data: a corrupt JPEG inside a shard, a truncated tar, a missing shard -- skipped and counted, or a clear
error naming the shard URL and the sample key once the failure fraction passes data.max_failure_fraction."""

from __future__ import annotations

import logging
import os

import pytest

from mmt.data.build.builder import write_samples
from mmt.data.build.process import Processed
from mmt.data.faults import DataError
from mmt.data.loader import build_eval_loader, build_train_loader
from mmt.data.synthetic import synthetic_sample
from tests.fixtures_data import data_config, epoch_keys

N, PER_SHARD = 40, 10
BAD_KEY = "sample000013"


def _shards(out, corrupt: set[str] = frozenset()) -> str:
    def samples():
        for i in range(N):
            s = synthetic_sample(i)
            if s["__key__"] in corrupt:
                s["jpg"] = s["jpg"][:40] + b"\x00garbage" * 20  # a JPEG header, then junk
            yield Processed(s["__key__"], str(i), s)

    return write_samples(samples(), str(out), max_samples_per_shard=PER_SHARD)["urls"]


def test_corrupt_jpeg_is_skipped_and_logged(tmp_path, caplog):
    urls = _shards(tmp_path / "s", {BAD_KEY})
    cfg = data_config(tmp_path, train_urls=urls, max_failure_fraction=0.1, failure_check_after=1)
    loader = build_train_loader(cfg, 0, 1, 8)
    with caplog.at_level(logging.WARNING, logger="mmt.data"):
        keys = sum(epoch_keys(loader), [])
    assert BAD_KEY not in keys and len(keys) == N - 1
    assert loader.stats()["samples_failed"] == 1 and loader.stats()["samples_read"] == N
    logged = [r.getMessage() for r in caplog.records if BAD_KEY in r.getMessage()]
    assert logged and "shard-000001.tar" in logged[0]


def test_too_many_failures_is_a_clear_error(tmp_path):
    urls = _shards(tmp_path / "s", {BAD_KEY})
    cfg = data_config(tmp_path, train_urls=urls, max_failure_fraction=0.0, failure_check_after=1)
    with pytest.raises(DataError) as err:
        epoch_keys(build_train_loader(cfg, 0, 1, 8))
    msg = str(err.value)
    assert "shard-000001.tar" in msg and BAD_KEY in msg and "data.max_failure_fraction=0.0" in msg


def test_truncated_tar_keeps_the_samples_before_the_damage(tmp_path, caplog):
    urls = _shards(tmp_path / "s")
    shard = tmp_path / "s" / "shard-000002.tar"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)  # its index sidecar now names the wrong size: the shard is rescanned
    cfg = data_config(tmp_path, train_urls=urls, val_urls=urls, max_failure_fraction=0.3)
    with caplog.at_level(logging.WARNING):
        loader = build_eval_loader(cfg, 0, 1, 7)
    keys = sum(epoch_keys(loader), [])
    lost = [f"sample{i:06d}" for i in range(20, 30) if f"sample{i:06d}" not in keys]
    assert 0 < len(lost) < PER_SHARD  # the tail of shard 2 only
    assert len(keys) == len(set(keys)) == N - len(lost)
    assert any("shard-000002.tar" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)


def test_truncated_tar_in_the_streaming_loader(tmp_path):
    urls = _shards(tmp_path / "s")
    shard = tmp_path / "s" / "shard-000002.tar"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    cfg = data_config(tmp_path, train_urls=urls, loader="streaming", shuffle=False, max_failure_fraction=0.5)
    loader = build_train_loader(cfg, 0, 1, 5)
    keys = sum(epoch_keys(loader), [])
    assert len(keys) == len(set(keys)) and N - PER_SHARD <= len(keys) < N
    assert loader.stats()["samples_failed"] >= 1


def test_missing_shard(tmp_path, caplog):
    urls = _shards(tmp_path / "s")
    os.remove(tmp_path / "s" / "shard-000003.tar")
    tolerant = data_config(tmp_path, train_urls=urls, max_failure_fraction=0.3)
    with caplog.at_level(logging.WARNING):
        loader = build_train_loader(tolerant, 0, 1, 10)
    assert len(sum(epoch_keys(loader), [])) == N - PER_SHARD
    assert loader.stats()["shards_failed"] == 1
    assert any("shard-000003.tar" in r.getMessage() for r in caplog.records)
    strict = data_config(tmp_path, train_urls=urls, max_failure_fraction=0.1)
    with pytest.raises(DataError, match=r"1 of 4 shards .*shard-000003.tar: shard not found"):
        build_train_loader(strict, 0, 1, 10)
