"""The batch script's requeue logic on a real Slurm cluster, with a stand-in trainer (tests/slurm_standin.py).

The stand-in is a real 2-rank job that keeps only a counter and starts in a blink, so these tests cover the
signal variants (USR1 / TERM / HUP, --batch / --full, srun / torchrun) and bounded retries cheaply;
tests/test_slurm_train.py runs `mmt train` itself (preemption, a rank killed mid-save, sweeps, MLflow).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from mmt.slurm.cli import main as slurm_main
from mmt.slurm.scontrol import wait_for_jobs
from tests.fixtures_slurm import REPO, wait_for

JOB_TIMEOUT_S = 90
pytestmark = pytest.mark.usefixtures("slurm_cluster")


def _config(tmp_path: Path, steps: int = 8, interval: int = 2, **env: str) -> Path:
    cfg = {
        "train": {"max_steps": steps, "checkpoint_interval": interval, "global_batch": 4},
        "tracking": {"run_name": "standin"},
        "slurm": {
            "ntasks_per_node": 2,
            "entry": "tests.slurm_standin",
            "time": "00:10:00",
            "signal_seconds": 60,
            "env": {"PYTHONPATH": str(REPO), "STANDIN_STEP_S": "0.25", **env},
        },
    }
    path = tmp_path / "standin.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _submit(tmp_path: Path, config: Path, *args: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(tmp_path)
    assert slurm_main(["submit", str(config), *args]) == 0
    jobs = sorted(tmp_path.glob("runs/**/slurm_jobs.txt"))
    return jobs[0].read_text().split()[-1]


def _keys(run_dir: Path, world: int = 2) -> list[list[dict]]:
    return [
        [json.loads(line) for line in (run_dir / "keys" / f"rank_{r:05d}.jsonl").read_text().splitlines()]
        for r in range(world)
    ]


def _log(run_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(run_dir.glob("slurm-*.out")))


def _assert_exactly_once(run_dir: Path, steps: int, global_batch: int = 4) -> None:
    """Every step exactly once per rank, and every sample id 0..steps*global_batch-1 exactly once overall."""
    seen = []
    for records in _keys(run_dir):
        assert [r["step"] for r in records] == list(range(1, steps + 1))
        seen += [k for r in records for k in r["keys"]]
    assert sorted(seen) == list(range(steps * global_batch))


@pytest.mark.parametrize(
    ("launch", "sig", "scope"),
    [("srun", "USR1", "--full"), ("torchrun", "HUP", "--batch"), ("srun", "TERM", "--batch")],
)
def test_signal_checkpoints_requeues_and_resumes(tmp_path, monkeypatch, launch, sig, scope):
    config = _config(tmp_path, steps=20, interval=4)
    job = _submit(tmp_path, config, "--launch", launch, "--signal", sig, monkeypatch=monkeypatch)
    run_dir = tmp_path / "runs" / "standin"
    rank0 = run_dir / "keys" / "rank_00000.jsonl"
    wait_for(lambda: rank0.is_file() and rank0.read_text().strip(), 60, "the first training step")
    # The signal Slurm sends before the time limit (--signal=B:...), delivered now; --full also hits the ranks.
    subprocess.run(["scancel", f"--signal={sig}", scope, job], check=True)
    (info,) = wait_for_jobs(job, JOB_TIMEOUT_S)
    log = _log(run_dir)
    assert info.state == "COMPLETED", log
    assert info.restarts == 1, log
    assert "mmt-slurm: preempted" in log and "start at step 0, restart 0" in log
    saved = int(re.search(r"stand-in: preempted, saved step (\d+)", log).group(1))
    assert saved >= 1 and f"start at step {saved}, restart 1" in log, log  # resumed where it saved
    assert "mmt-slurm: training finished" in log
    _assert_exactly_once(run_dir, 20)
    assert {r["restart"] for r in _keys(run_dir)[0]} == {0, 1}
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000020"


def test_failures_are_retried_a_bounded_number_of_times(tmp_path, monkeypatch):
    config = _config(tmp_path, STANDIN_FAIL="1")
    job = _submit(tmp_path, config, "--max-failures", "1", monkeypatch=monkeypatch)
    (info,) = wait_for_jobs(job, JOB_TIMEOUT_S)
    log = _log(tmp_path / "runs" / "standin")
    assert info.state == "FAILED", log
    assert info.restarts == 1, log
    assert info.exit_code != "0:0"
    assert "failure 1 of at most 1 retried" in log
    assert "2 failures exceed slurm.max_failures=1, not requeueing" in log


def test_scancel_cancels_without_requeue(tmp_path, monkeypatch):
    # The ranks save and exit with the preemption code on SIGTERM, yet a cancelled job must stay cancelled.
    config = _config(tmp_path, steps=40)
    job = _submit(tmp_path, config, monkeypatch=monkeypatch)
    run_dir = tmp_path / "runs" / "standin"
    rank0 = run_dir / "keys" / "rank_00000.jsonl"
    wait_for(lambda: rank0.is_file() and rank0.read_text().strip(), 60, "the first training step")
    subprocess.run(["scancel", job], check=True)
    (info,) = wait_for_jobs(job, JOB_TIMEOUT_S)
    log = _log(run_dir)
    assert info.state == "CANCELLED" and info.restarts == 0, log
    assert "(cancelled or ended by Slurm): not requeueing" in log
