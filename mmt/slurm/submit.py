"""Write a planned job and hand it to sbatch."""

from __future__ import annotations

from mmt.slurm.job import JobPlan, write_job
from mmt.slurm.scontrol import run_slurm


def submit(plan: JobPlan) -> str:
    """Write configs and script, run ``sbatch``, return the job id (recorded in ``<job_dir>/slurm_jobs.txt``)."""
    script = write_job(plan)
    out = run_slurm(["sbatch", "--parsable", str(script)]).strip()
    job_id = out.split(";")[0]
    if not job_id.isdigit():
        raise RuntimeError(f"sbatch {script}: unexpected output {out!r}")
    with open(plan.job_dir / "slurm_jobs.txt", "a") as f:
        f.write(f"{job_id}\n")
    return job_id
