"""`mmt train` under real Slurm: both launch modes, preemption + requeue + exact resume, a rank killed mid-save.

Each job is 2 CPU ranks (gloo) on the local test cluster, training the tiny tri-modal model for a few steps on
shards made here; every test uses its own MLflow experiment in one SQLite store (migrated once).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from mmt.slurm.cli import main as slurm_main
from mmt.slurm.scontrol import wait_for_jobs
from tests.fixtures_slurm import kill_rank, wait_for
from tests.fixtures_train import write_config, write_shards

JOB_TIMEOUT_S = 240
STEPS = 16  # x global batch 8 = 128 samples = one epoch of the shards: every sample exactly once
pytestmark = pytest.mark.usefixtures("slurm_cluster")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("slurm_shards"), STEPS * 8, per_shard=32)


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One SQLite store for the module, migrated here once (not by two array tasks at the same time)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('slurm_mlflow') / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()
    return uri


def _submit(
    tmp_path: Path,
    monkeypatch,
    shards: str,
    uri: str,
    name: str,
    *args: str,
    steps: int = STEPS,
    interval: int = 0,
) -> tuple[str, Path]:
    run_dir = tmp_path / "runs" / name
    config = write_config(
        tmp_path / f"{name}.yaml",
        train_urls=shards,
        run_dir=run_dir,
        train={
            "max_steps": steps,
            "checkpoint_interval": interval,
            "checkpoint_at_end": True,
            "record_keys": True,
            "keep_last": 0,
        },
        tracking={
            "backend": "mlflow",
            "uri": uri,
            "experiment": f"slurm-{name}",
            "run_name": name,
            "flush_interval_s": 0.5,
        },
    )
    monkeypatch.chdir(tmp_path)
    assert slurm_main(["submit", str(config), "--ntasks-per-node", "2", "--time", "00:15:00", *args]) == 0
    return (run_dir / "slurm_jobs.txt").read_text().split()[-1], run_dir


def _log(run_dir: Path) -> str:
    text = "\n".join(p.read_text(errors="replace") for p in sorted(run_dir.glob("slurm-*.out")))
    return "\n".join(line for line in text.splitlines() if not line.startswith("[20"))  # DeepSpeed info lines


def _only_run(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(f"slurm-{name}")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def _loss_steps(client, run) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))


def _keys_by_attempt(run_dir: Path, rank: int) -> list[dict]:
    return [
        json.loads(line) for line in (run_dir / "keys" / f"rank_{rank:05d}.jsonl").read_text().splitlines()
    ]


@pytest.mark.parametrize("launch", ["srun", "torchrun"])
def test_job_trains_and_logs_to_mlflow(tmp_path, monkeypatch, shards, tracking_uri, launch):
    job, run_dir = _submit(
        tmp_path, monkeypatch, shards, tracking_uri, f"plain-{launch}", "--launch", launch, steps=3
    )
    (info,) = wait_for_jobs(job, JOB_TIMEOUT_S)
    log = _log(run_dir)
    assert info.state == "COMPLETED" and info.restarts == 0, log
    assert "mmt: done at step 3" in log and "mmt-slurm: training finished" in log
    assert "terminate called" not in log
    client, run = _only_run(tracking_uri, f"plain-{launch}")
    assert run.info.status == "FINISHED"
    assert _loss_steps(client, run) == [1, 2, 3]
    tags = run.data.tags
    assert tags["mmt.world_size"] == "2"
    assert tags["mmt.launcher"] == ("slurm" if launch == "srun" else "torchrun")
    assert tags["mmt.slurm_job_id"] == job


def test_preempted_job_requeues_and_resumes_exactly(tmp_path, monkeypatch, shards, tracking_uri):
    job, run_dir = _submit(tmp_path, monkeypatch, shards, tracking_uri, "preempt")
    keys0 = run_dir / "keys" / "rank_00000.jsonl"
    # Signal as soon as training runs: the steps left must outlast the signal's way through Slurm on a busy machine.
    wait_for(lambda: keys0.is_file() and keys0.read_text().strip(), 180, "the first training step")
    # What Slurm does `signal_seconds` before the time limit (#SBATCH --signal=B:USR1@...), done now.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    (info,) = wait_for_jobs(job, JOB_TIMEOUT_S)
    log = _log(run_dir)
    assert info.state == "COMPLETED", log
    assert info.restarts == 1, log
    assert "mmt: preempted (SIGUSR1) at step" in log, log
    # An orderly exit on every rank: srun's SIGTERM to the ranks still shutting down (--kill-on-bad-exit, once the
    # first exited with 75) is ignored, so rank 0 closes its MLflow run and all exit 75 (143 = killed by it).
    assert (
        "mmt: preemption shutdown complete; exit 75" in log and "mmt-slurm: preempted (exit code 75)" in log
    ), log
    preempted_at = int(log.split("mmt: preempted (SIGUSR1) at step ")[1].split(";")[0])
    assert 1 <= preempted_at < STEPS, log
    assert f"at step {preempted_at} ({preempted_at * 8} samples)" in log  # the resume line
    # Continuous steps, and every sample of the epoch exactly once over both attempts and both ranks.
    seen = []
    for rank in (0, 1):
        records = _keys_by_attempt(run_dir, rank)
        assert [r["step"] for r in records] == list(range(STEPS)), records
        seen += [k for r in records for k in r["keys"]]
    assert len(seen) == STEPS * 8 and len(set(seen)) == len(seen)
    # One MLflow run holds the whole history; the restart is recorded on it.
    client, run = _only_run(tracking_uri, "preempt")
    assert run.info.status == "FINISHED"
    assert _loss_steps(client, run) == list(range(1, STEPS + 1))
    assert run.data.tags["mmt.slurm_restart_count"] == "1"
    assert run.data.tags["mmt.slurm_job_id"] == job
    assert run.data.tags["mmt.slurm_nodelist"]  # the node list of the (last) allocation
    assert run.data.tags["mmt.hostnames"]
    assert not (run_dir / "preempted.json").exists()


def test_rank_killed_mid_save_restarts_from_last_complete_checkpoint(
    tmp_path, monkeypatch, shards, tracking_uri
):
    name = "hardkill"
    run_dir = tmp_path / "runs" / name
    # Hold rank 1 inside step 4's save, deterministically: its optimizer shard's path is a FIFO, so opening it
    # for writing blocks (like a hung file system) while rank 0's files of that checkpoint are already written.
    partial = run_dir / "checkpoints" / "step_00000004"
    partial.mkdir(parents=True)
    fifo = partial / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    os.mkfifo(fifo)
    job, _ = _submit(tmp_path, monkeypatch, shards, tracking_uri, name, steps=6, interval=2)
    wait_for(
        lambda: (partial / "mp_rank_00_model_states.pt").is_file(), 180, "rank 0's part of step 4's save"
    )
    killed = kill_rank(job, "SLURM_PROCID", 1)
    fifo.unlink()  # the retry must be able to save step 4
    assert not (partial / "mmt_meta.json").exists()  # killed while this checkpoint was incomplete
    (info,) = wait_for_jobs(job, JOB_TIMEOUT_S)
    log = _log(run_dir)
    assert info.state == "COMPLETED", log
    assert info.restarts == 1, log
    assert "failure 1 of at most 3 retried" in log, log
    assert f"resumed from {run_dir}/checkpoints/step_00000002 at step 2" in log, (killed, log)
    assert "mmt: done at step 6" in log
    for rank in (0, 1):
        records = _keys_by_attempt(run_dir, rank)
        # The first attempt trained steps 1-4 (recorded as 0-3); the restart replays steps 3-4 from step 2's
        # data position, on the same samples.
        assert [r["step"] for r in records] == [0, 1, 2, 3, 2, 3, 4, 5], records
        assert records[2]["keys"] == records[4]["keys"] and records[3]["keys"] == records[5]["keys"]
    meta = json.loads((run_dir / "checkpoints" / "step_00000006" / "mmt_meta.json").read_text())
    assert meta["complete"] and meta["step"] == 6
    _, run = _only_run(tracking_uri, name)  # the restart continued the same MLflow run
    assert run.info.status == "FINISHED"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["resume"] == "auto"


def test_sweep_gives_one_mlflow_run_per_value(tmp_path, monkeypatch, shards, tracking_uri):
    # One rank per array task, so both tasks run at once on the 2-CPU test node.
    run_dir = tmp_path / "runs" / "sweep"
    config = write_config(
        tmp_path / "sweep.yaml",
        train_urls=shards,
        run_dir=run_dir,
        train={"max_steps": 2, "checkpoint_at_end": True},
        tracking={"backend": "mlflow", "uri": tracking_uri, "experiment": "slurm-sweep", "run_name": "sweep"},
    )
    monkeypatch.chdir(tmp_path)
    assert (
        slurm_main(
            [
                "submit",
                str(config),
                "--ntasks-per-node",
                "1",
                "--time",
                "00:15:00",
                "--sweep",
                "train.optimizer.lr=0.001,0.002",
            ]
        )
        == 0
    )
    job = (run_dir / "slurm_jobs.txt").read_text().split()[-1]
    infos = wait_for_jobs(job, JOB_TIMEOUT_S, predicate=lambda i: len(i) == 2 and all(x.final for x in i))
    assert [i.state for i in infos] == ["COMPLETED", "COMPLETED"], _log(run_dir)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("slurm-sweep").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert sorted(by_name) == ["sweep-lr=0.001", "sweep-lr=0.002"]
    for lr, task in (("0.001", "0"), ("0.002", "1")):
        run = by_name[f"sweep-lr={lr}"]
        assert run.info.status == "FINISHED"
        assert float(run.data.params["train.optimizer.lr"]) == float(lr)
        assert run.data.tags["mmt.slurm_array_task_id"] == task
        assert run.data.tags["mmt.run_dir"] == str(run_dir / f"lr={lr}")
        assert _loss_steps(client, run) == [1, 2]
