"""Typed configuration of Slurm jobs: the `slurm.*` section, read by `mmt slurm submit`.

It lives in the config tree (not only on the command line) so an experiment YAML can carry its cluster shape,
and the resolved config copied into the run directory records how the job was launched. `mmt slurm submit`
flags (``--nodes`` ...) are applied as overrides of these keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mmt.config.errors import ConfigError
from mmt.config.fields import cfg_field

# sbatch --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S ("" leaves the partition default).
_TIME = re.compile(r"^(\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2})$")


def time_limit_seconds(spec: str) -> int | None:
    """Seconds of an sbatch ``--time`` string (None for "" / unlimited)."""
    if not spec or spec in ("infinite", "unlimited", "UNLIMITED", "INFINITE"):
        return None
    days = 0
    if "-" in spec:
        d, spec = spec.split("-", 1)
        days = int(d)
        parts = [int(p) for p in spec.split(":")]
        h, m, s = (parts + [0, 0])[:3]
    else:
        parts = [int(p) for p in spec.split(":")]
        h, m, s = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]  # type: ignore[assignment]
    return ((days * 24 + h) * 60 + m) * 60 + s


@dataclass
class SlurmConfig:
    nodes: int = cfg_field(1, doc="nodes to allocate (the most, when min_nodes is set)", ge=1)
    min_nodes: int = cfg_field(
        0,
        doc="fewest nodes the job may run on (sbatch --nodes=min_nodes-nodes); a requeued job then starts on "
        "the nodes left after a node is lost and resumes on the smaller world size (0: exactly `nodes`)",
        ge=0,
    )
    gpus_per_node: int = cfg_field(
        0, doc="GPUs per node; one rank per GPU (0: CPU nodes, see ntasks_per_node)", ge=0
    )
    ntasks_per_node: int = cfg_field(
        1,
        doc="ranks per node on CPU nodes (gpus_per_node=0); with GPUs the rank count is gpus_per_node",
        ge=1,
    )
    cpus_per_task: int = cfg_field(1, doc="CPU cores per rank (also OMP_NUM_THREADS)", ge=1)
    mem: str = cfg_field("", doc="memory per node, sbatch --mem (e.g. 200G; '': the partition default)")
    partition: str = cfg_field("", doc="sbatch --partition ('': the cluster default)")
    account: str = cfg_field("", doc="sbatch --account ('': none)")
    qos: str = cfg_field("", doc="sbatch --qos ('': none)")
    time: str = cfg_field("01:00:00", doc="time limit, sbatch --time (D-HH:MM:SS, HH:MM:SS, MM; '': default)")
    job_name: str = cfg_field("", doc="sbatch --job-name ('': tracking.run_name)")
    launch: str = cfg_field(
        "srun",
        doc="srun: one task per rank, ranks from SLURM_* (default); torchrun: one task per node running "
        "torchrun with c10d rendezvous on the head node",
        choices=("srun", "torchrun"),
    )
    signal: str = cfg_field(
        "USR1",
        doc="signal Slurm sends to the batch shell signal_seconds before the time limit; forwarded to every "
        "rank, which checkpoints and exits, then the job requeues itself",
        choices=("USR1", "TERM", "HUP"),
    )
    signal_seconds: int = cfg_field(
        180, doc="how long before the time limit the signal comes (must cover one step plus a save)", ge=1
    )
    max_failures: int = cfg_field(
        3,
        doc="requeues after failures other than preemption (a crash, a killed rank); then the job fails",
        ge=0,
    )
    master_port: int = cfg_field(
        0, doc="rendezvous port on the head node (0: derived from the job id)", ge=0, le=65535
    )
    python: str = cfg_field("", doc="interpreter the ranks run ('': the one running `mmt slurm submit`)")
    entry: str = cfg_field(
        "mmt.cli train",
        doc="module (and leading arguments) each rank runs with `python -m`; the config path follows",
    )
    setup: str = cfg_field(
        "", doc="shell lines run in the batch script before launching (module load, env vars)"
    )
    sbatch_args: list[str] = cfg_field(
        default_factory=list, doc="extra #SBATCH options, e.g. ['--exclusive', '--constraint=a100']"
    )
    env: dict[str, str] = field(default_factory=dict, metadata={"doc": "variables exported to every rank"})

    def check(self, source: str, prefix: str) -> None:
        if self.time and not _TIME.match(self.time) and self.time.lower() not in ("infinite", "unlimited"):
            raise ConfigError(
                source, f"{prefix}time", f"{self.time!r} is not an sbatch time (e.g. 04:00:00, 2-00:00:00)"
            )
        limit = time_limit_seconds(self.time)
        if limit is not None and self.signal_seconds >= limit:
            raise ConfigError(
                source,
                f"{prefix}signal_seconds",
                f"{self.signal_seconds} s is not shorter than the time limit {self.time!r} ({limit} s)",
            )
        if self.min_nodes > self.nodes:
            raise ConfigError(
                source, f"{prefix}min_nodes", f"{self.min_nodes} is more than {prefix}nodes={self.nodes}"
            )
        for arg in self.sbatch_args:
            if not arg.startswith("-"):
                raise ConfigError(
                    source, f"{prefix}sbatch_args", f"{arg!r} is not an sbatch option (starts with -)"
                )
        if not self.entry.split():
            raise ConfigError(source, f"{prefix}entry", "empty: name the module each rank runs")
