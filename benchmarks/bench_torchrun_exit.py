"""Repeated short `mmt train` runs under torchrun: is the workers' exit path clean every time?

torchrun workers on this machine have been seen to abort at interpreter exit after training finished
("terminate called without an active exception", about 1 run in 15): a C++ thread still joinable when the
process tears down. A job that dies that way looks failed to torchrun (exit 1) and costs a requeue under Slurm.
This script runs N tiny 2-rank jobs and counts clean exits, aborts and other failures:

    .venv/bin/python benchmarks/bench_torchrun_exit.py --runs 30                  # plain torchrun
    .venv/bin/python benchmarks/bench_torchrun_exit.py --runs 10 --slurm          # mmt slurm submit --launch torchrun
                                                                                 # (starts a local cluster)

Each run: tiny tri-modal model, 2 CPU ranks (gloo), ZeRO-2, 2 steps, a checkpoint at the end, MLflow off.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ABORT = re.compile(r"terminate called|Aborted|core dumped|exitcode\s*:\s*-6|SIGABRT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(work: Path, index: int) -> Path:
    from mmt.data.synthetic import write_synthetic_shards

    shards = work / "shards"
    if not shards.exists():
        write_synthetic_shards(str(shards), 32, 16)
    urls = str(shards / "shard-{000000..000001}.tar")
    cfg = {
        "model": str(ROOT / "configs" / "model" / "tiny_tri.yaml"),
        "data": {"train_urls": urls, "num_workers": 0, "cache_dir": str(work / "cache")},
        "train": {
            "run_dir": str(work / "runs" / f"r{index:03d}"),
            "global_batch": 8,
            "max_steps": 2,
            "log_interval": 1,
            "progress_bar": False,
            "torch_threads": 1,
            "zero_stage": 2,
        },
        "tracking": {"backend": "none", "run_name": f"r{index:03d}"},
        "slurm": {"ntasks_per_node": 2, "time": "00:20:00"},
    }
    path = work / f"r{index:03d}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _classify(rc: int, out: str) -> str:
    if ABORT.search(out):
        return "abort"
    return "clean" if rc == 0 else "failed"


def _run_torchrun(config: Path, env: dict[str, str]) -> tuple[int, str]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
        "-m",
        "mmt.cli",
        "train",
        str(config),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def _run_slurm(config: Path, env: dict[str, str]) -> tuple[int, str]:
    from mmt.slurm.scontrol import wait_for_jobs

    out = subprocess.run(
        [sys.executable, "-m", "mmt.cli", "slurm", "submit", str(config), "--launch", "torchrun"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=config.parent,
        check=True,
    ).stdout
    job = re.search(r"submitted job (\d+)", out).group(1)
    (info,) = wait_for_jobs(job, 900)
    run_dir = Path(yaml.safe_load(config.read_text())["train"]["run_dir"])
    log = "\n".join(p.read_text(errors="replace") for p in run_dir.glob("slurm-*.out"))
    # A requeue after a worker abort still ends COMPLETED: count a restart as a failure of the exit path.
    rc = 0 if info.state == "COMPLETED" and info.restarts == 0 else 1
    return rc, log


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument(
        "--slurm", action="store_true", help="submit through a local Slurm cluster (torchrun mode)"
    )
    p.add_argument("--keep", default="", help="keep logs and runs in this folder")
    args = p.parse_args(argv)
    work = Path(args.keep or tempfile.mkdtemp(prefix="torchrun_exit_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env.pop("MLFLOW_TRACKING_URI", None)
    cluster_env = {
        **env,
        "MMT_SLURM_DIR": str(work / "slurm"),
        "MMT_SLURMCTLD_PORT": str(_free_port()),
        "MMT_SLURMD_PORT": str(_free_port()),
    }
    if args.slurm:
        subprocess.run(
            ["bash", str(ROOT / "slurm" / "local_cluster.sh"), "start"], env=cluster_env, check=True
        )
        env["SLURM_CONF"] = os.environ["SLURM_CONF"] = str(work / "slurm" / "slurm.conf")
    counts = {"clean": 0, "abort": 0, "failed": 0}
    times = []
    try:
        for i in range(args.runs):
            config = _config(work, i)
            t0 = time.perf_counter()
            rc, out = (_run_slurm if args.slurm else _run_torchrun)(config, env)
            times.append(time.perf_counter() - t0)
            kind = _classify(rc, out)
            counts[kind] += 1
            (work / f"r{i:03d}.log").write_text(out)
            print(f"run {i + 1:3d}/{args.runs}: {kind:6s} rc={rc} {times[-1]:.1f} s", flush=True)
    finally:
        if args.slurm:
            subprocess.run(["bash", str(ROOT / "slurm" / "local_cluster.sh"), "stop"], env=cluster_env)
    n = sum(counts.values())
    print(
        f"\n{'slurm torchrun' if args.slurm else 'torchrun'}: {n} runs, clean {counts['clean']}/{n}, "
        f"abort at exit {counts['abort']}/{n}, other failures {counts['failed']}/{n}; "
        f"mean {sum(times) / max(1, n):.1f} s per run; logs in {work}"
    )
    return 0 if counts["clean"] == n else 1


if __name__ == "__main__":
    sys.exit(main())
