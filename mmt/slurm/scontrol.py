"""Read job state back from Slurm: `scontrol show job -o` is immediate, unlike `sbatch --wait` (polls 2-10 s)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass

# Job states after which nothing more happens to the job (a requeued job goes back to PENDING instead).
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "OUT_OF_MEMORY",
        "NODE_FAIL",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
    }
)
_KEY = re.compile(r" (?=[A-Za-z][A-Za-z0-9_:/]*=)")


class SlurmError(RuntimeError):
    pass


def slurm_command(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SlurmError(
            f"{name} not found on PATH: is Slurm installed? (a local test cluster: "
            "bash slurm/local_cluster.sh start)"
        )
    return path


def run_slurm(args: list[str], timeout: float = 60) -> str:
    exe = slurm_command(args[0])
    proc = subprocess.run([exe, *args[1:]], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        said = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise SlurmError(f"{' '.join(args)} failed ({proc.returncode}): {'; '.join(x.strip() for x in said)}")
    return proc.stdout


@dataclass
class JobInfo:
    job_id: str
    state: str
    restarts: int
    exit_code: str
    fields: dict[str, str]

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


def parse_show_job(line: str) -> JobInfo:
    fields = {}
    for part in _KEY.split(line.strip()):
        key, _, value = part.partition("=")
        fields[key] = value
    return JobInfo(
        fields.get("JobId", ""),
        fields.get("JobState", ""),
        int(fields.get("Restarts", "0") or 0),
        fields.get("ExitCode", ""),
        fields,
    )


def show_job(job_id: str) -> list[JobInfo]:
    """One entry per job (several for an array: one per task, once the tasks exist)."""
    out = run_slurm(["scontrol", "show", "job", "-o", str(job_id)])
    return [parse_show_job(line) for line in out.splitlines() if line.strip()]


def wait_for_jobs(job_id: str, timeout: float, poll: float = 0.25, predicate=None) -> list[JobInfo]:
    """Poll until every job of ``job_id`` is final (or ``predicate(infos)`` holds); TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        infos = show_job(job_id)
        done = predicate(infos) if predicate else (infos and all(i.final for i in infos))
        if done:
            return infos
        if time.monotonic() > deadline:
            states = ", ".join(f"{i.job_id}={i.state}" for i in infos)
            raise TimeoutError(f"job {job_id} not done after {timeout:.0f} s ({states})")
        time.sleep(poll)
