"""The trainer's contract, in one process: `Trainer.__init__` builds every attribute the run uses, any loader
satisfying `mmt.data.protocol.TrainLoader` drives it, and a failure during the build releases what was built."""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator
from typing import Any

import pytest
import torch.distributed as dist

from mmt.config import ConfigError, load_config
from mmt.data.indexed import IndexedLoader
from mmt.data.loader import build_train_loader
from mmt.data.protocol import TrainLoader
from mmt.data.streaming import StreamingLoader
from mmt.training.trainer import Trainer
from tests.fixtures_train import train_rows, write_config, write_shards


class ProtocolOnly:
    """A loader offering nothing but `TrainLoader`'s members (over a real one), recording which were called."""

    def __init__(self, inner: TrainLoader) -> None:
        assert isinstance(inner, TrainLoader)
        self.inner, self.calls = inner, []

    @property
    def epoch(self) -> int:
        return self.inner.epoch

    @property
    def num_samples(self) -> int | None:
        return self.inner.num_samples

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.calls.append("iter")
        return iter(self.inner)

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        self.calls.append("state_dict")
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()

    def io_stats(self) -> dict[str, float] | None:
        self.calls.append("io_stats")
        return None

    def close(self) -> None:
        self.calls.append("close")
        self.inner.close()


def test_a_protocol_loader_drives_the_run_and_init_builds_every_attribute(tmp_path):
    urls = write_shards(tmp_path / "shards", 16, per_shard=8)
    run_dir = tmp_path / "run"
    train = {"checkpoint_at_end": True, "zero_stage": 0, "max_steps": 3}  # 3 steps: a second epoch starts
    path = write_config(tmp_path / "c.yaml", train_urls=urls, run_dir=run_dir, train=train)
    cfg = load_config(str(path))
    loaders: list[ProtocolOnly] = []

    def factory(cfg, rank, world, plan):
        loaders.append(ProtocolOnly(build_train_loader(cfg, rank, world, plan.global_batch)))
        return loaders[-1]

    trainer = Trainer(cfg, str(path), train_loader_factory=factory)
    assert isinstance(loaders[0].inner, IndexedLoader)
    built = set(vars(trainer))
    result = trainer.run()
    assert set(vars(trainer)) == built  # the run created no attribute of its own
    assert (result.exit_code, result.step, result.samples_seen) == (0, 3, 24)
    losses = [r["train/loss"] for r in train_rows(run_dir).values()]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    calls = loaders[0].calls
    assert calls[:2] == ["iter", "io_stats"] and calls.count("iter") == 2 and calls.count("io_stats") == 3, (
        calls
    )
    assert calls[-2:] == ["state_dict", "close"], calls
    assert not dist.is_initialized()


def test_a_failing_build_releases_the_process_group_and_the_signal_handlers(tmp_path):
    """The streaming loader cannot count its samples for ``train.epochs``: the build stops at `total_steps`, after
    the process group and the loader were built; both are released and the preemption handlers restored."""
    urls = write_shards(tmp_path / "shards", 16, per_shard=16)
    path = write_config(
        tmp_path / "c.yaml",
        train_urls=urls,
        run_dir=tmp_path / "run",
        train={"max_steps": 0, "epochs": 1},
        data={"loader": "streaming"},
    )
    cfg = load_config(str(path))
    loaders: list[ProtocolOnly] = []

    def factory(cfg, rank, world, plan):
        loaders.append(ProtocolOnly(build_train_loader(cfg, rank, world, plan.global_batch)))
        return loaders[-1]

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ConfigError, match="train.epochs"):
        Trainer(cfg, str(path), train_loader_factory=factory)
    assert isinstance(loaders[0].inner, StreamingLoader) and loaders[0].calls == ["close"]
    assert not dist.is_initialized()
    assert signal.getsignal(signal.SIGTERM) is before
