"""What a run reports about itself: step metrics reduced over ranks, system tags, memory, the logger stack."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import torch

from mmt.config import Config
from mmt.data.protocol import TrainLoader
from mmt.secrets import redact, secret_patterns
from mmt.tracking.logger import ConsoleLogger, JsonlLogger, Logger, MultiLogger, NullLogger, RedactingLogger
from mmt.tracking.mlflow_logger import MLflowLogger
from mmt.training import distributed as D
from mmt.training.inputs import to_device


class DataWaitClock:
    """How long the steps block on their loader, against the steps' whole wall time.

    A step's wait is the wall time of ``next(loader)`` plus the copy of its tensors to the device; the step runs
    from that fetch to the end of its optimizer step (evaluation and checkpoints between steps count in neither).
    Host clock only, so it costs no synchronisation and no ``.item()``: on CUDA the copy from pinned memory is
    asynchronous, and the wait it causes shows where the host first waits for the device.
    """

    def __init__(self) -> None:
        self.wait_s = 0.0
        self.step_s = 0.0
        self._start: float | None = None

    def fetch(self, batches: Iterator[dict[str, Any]], device: torch.device) -> dict[str, Any]:
        """The next batch, on ``device``; the time this blocked is counted as data wait."""
        start = time.perf_counter()
        batch = to_device(next(batches), device)
        self.wait_s += time.perf_counter() - start
        self._start = start
        return batch

    def step_done(self) -> None:
        """Closes the step opened by the last `fetch`."""
        if self._start is not None:
            self.step_s += time.perf_counter() - self._start
            self._start = None

    @property
    def fraction(self) -> float:
        """Share of step time spent waiting for data, in [0, 1] (0 before any step)."""
        return min(1.0, self.wait_s / self.step_s) if self.step_s > 0 else 0.0


class StepMeter:
    """Sums of step metrics between two log lines; reduced over ranks only when a line is logged.

    The sums stay tensors on the step's device until `reduce`: a ``float()`` per metric and step would make the
    host wait for the device every step (on CUDA it drains the queue the next step's kernels should fill).
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, int] = {}
        self.tokens: torch.Tensor | int = 0
        self.samples = 0
        self.data = DataWaitClock()
        self.t0 = time.perf_counter()

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            v = v.detach().double() if isinstance(v, torch.Tensor) else float(v)
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def reduce(self, device: torch.device) -> tuple[dict[str, float], int, float]:
        keys = sorted(set().union(*D.gather_objects(sorted(self.sums))))
        vec = torch.tensor(
            [float(self.sums.get(k, 0.0)) for k in keys]  # the one host sync per logged line
            + [float(self.counts.get(k, 0)) for k in keys]
            + [self.data.wait_s, self.data.step_s, float(self.tokens)],
            dtype=torch.float64,
        )
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            vec = vec.to(device if device.type == "cuda" else "cpu")
            torch.distributed.all_reduce(vec)
            vec = vec.cpu()
        n = len(keys)
        means = {k: vec[i].item() / max(1.0, vec[n + i].item()) for i, k in enumerate(keys)}
        # Summed over ranks: the mean share of step time the ranks waited for their loaders.
        wait_s, step_s = vec[2 * n].item(), vec[2 * n + 1].item()
        means["data_wait_frac"] = min(1.0, wait_s / step_s) if step_s > 0 else 0.0
        elapsed = time.perf_counter() - self.t0
        return means, int(vec[-1].item()), elapsed


def system_tags(env: D.DistEnv, device: torch.device) -> dict[str, str]:
    """Where and with what a run ran: versions, git commit, launcher, Slurm job and restart count."""
    import deepspeed

    tags = {
        "mmt.world_size": str(env.world_size),
        "mmt.launcher": env.launcher,
        "mmt.torch_version": torch.__version__,
        "mmt.deepspeed_version": deepspeed.__version__,
        "mmt.python_version": platform.python_version(),
        "mmt.device": str(device.type) if device.type == "cpu" else torch.cuda.get_device_name(device),
    }
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        if commit:
            tags["mmt.git_commit"] = commit
            tags["mmt.git_dirty"] = str(bool(dirty)).lower()
    except (OSError, subprocess.SubprocessError):
        pass
    for var, tag in (
        ("SLURM_JOB_ID", "mmt.slurm_job_id"),
        ("SLURM_RESTART_COUNT", "mmt.slurm_restart_count"),
        ("SLURM_JOB_NODELIST", "mmt.slurm_nodelist"),
        ("SLURM_JOB_NAME", "mmt.slurm_job_name"),
        ("SLURM_ARRAY_TASK_ID", "mmt.slurm_array_task_id"),
        ("TORCHELASTIC_RESTART_COUNT", "mmt.torchelastic_restart_count"),
    ):
        if os.environ.get(var):
            tags[tag] = os.environ[var]
    return tags


def grad_norm(module: torch.nn.Module) -> float:
    """Global L2 norm of the (already reduced) gradients of an unpartitioned module."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Process RSS, and GPU peak / reserved memory on CUDA, in GiB."""
    out: dict[str, float] = {}
    try:
        out["sys/rss_gb"] = psutil.Process().memory_info().rss / 2**30
    except Exception:  # noqa: BLE001 - memory stats are best effort
        pass
    if device.type == "cuda":
        out["sys/gpu_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["sys/gpu_reserved_gb"] = torch.cuda.memory_reserved(device) / 2**30
    return out


def process_tree_usage() -> tuple[float, float]:
    """(CPU seconds, resident bytes) of this process and its children (DataLoader workers, forkserver)."""
    cpu = rss = 0.0
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            cpu += t.user + t.system
            rss += p.memory_info().rss
        except psutil.Error:  # a worker that just exited
            continue
    return cpu, rss


class NodeMeter:
    """Per-node data I/O and system figures for the one run rank 0 logs: every rank's loader counters (bytes
    fetched, shard fetches, cache hits, download wait) and process-tree CPU / RSS, gathered at logging steps only
    (one small all_gather) and summed per node, logged as ``node<k>/...``.

    Ranks are grouped into nodes as launchers place them: ``GROUP_RANK`` (torchrun) if set, else
    ``rank // local_world_size`` (contiguous ranks per node).
    """

    def __init__(self, env: D.DistEnv) -> None:
        self.node = int(os.environ.get("GROUP_RANK") or env.rank // max(1, env.local_world_size))
        self.t0 = time.perf_counter()
        self.cpu0 = process_tree_usage()[0]

    def local(self, loader: TrainLoader) -> dict[str, float]:
        out: dict[str, float] = {"node": float(self.node)}
        io = loader.io_stats()
        if io is not None:
            for k in (
                "bytes_fetched",
                "shard_fetches",
                "range_reads",
                "cache_hits",
                "cache_misses",
                "wait_s",
            ):
                out[k] = float(io.get(k, 0))
        now, (cpu, rss) = time.perf_counter(), process_tree_usage()
        out["cpu_percent"] = 100.0 * (cpu - self.cpu0) / max(now - self.t0, 1e-9)
        out["rss_bytes"] = rss
        self.t0, self.cpu0 = now, cpu
        return out

    def reduce(self, loader: TrainLoader) -> dict[str, float]:
        """Every node's figures (on every rank; rank 0 logs them)."""
        per_node: dict[int, dict[str, float]] = {}
        for rank_figures in D.gather_objects(self.local(loader)):
            node = per_node.setdefault(int(rank_figures.pop("node")), {})
            for k, v in rank_figures.items():
                node[k] = node.get(k, 0.0) + v
        metrics: dict[str, float] = {}
        for node, f in sorted(per_node.items()):
            p = f"node{node}/"
            if "bytes_fetched" in f:
                reads = f["cache_hits"] + f["cache_misses"]
                metrics[p + "data_fetched_gb"] = f["bytes_fetched"] / 1e9
                metrics[p + "data_shard_fetches"] = f["shard_fetches"]
                metrics[p + "data_range_reads"] = f["range_reads"]
                metrics[p + "data_cache_hit_rate"] = f["cache_hits"] / reads if reads else 1.0
                metrics[p + "data_download_wait_s"] = f["wait_s"]
            metrics[p + "cpu_percent"] = f["cpu_percent"]
            metrics[p + "rss_gb"] = f["rss_bytes"] / 2**30
        return metrics


def build_logger(cfg: Config, rank: int, run_id: str | None, total_steps: int, run_dir: Path) -> Logger:
    """Rank 0: MLflow (unless tracking.backend=none) + console line + <run_dir>/metrics.jsonl; other ranks: none."""
    if rank != 0:
        return NullLogger()

    patterns = secret_patterns(cfg.tracking.redact_keys)

    loggers: list[Logger] = [ConsoleLogger(total_steps), JsonlLogger(run_dir / "metrics.jsonl")]
    if cfg.tracking.backend == "mlflow":
        tags = dict(t.split("=", 1) for t in cfg.tracking.tags if "=" in t)
        loggers.insert(
            0,
            MLflowLogger(
                cfg.tracking.experiment,
                cfg.tracking.run_name,
                uri=cfg.tracking.uri,
                run_id=run_id,
                tags=redact(tags, patterns),
                artifact_location=cfg.tracking.artifact_location,
                flush_interval_s=cfg.tracking.flush_interval_s,
            ),
        )
    return RedactingLogger(MultiLogger(*loggers), patterns)
