"""Turn a config (plus overrides and sweeps) into a rendered sbatch script and the run directories it uses.

Every job member gets its own run directory holding the resolved config it trains with; the batch script
points each rank at that copy, so editing the source YAML after submission cannot change a requeued job.
A sweep becomes a job array: one member (run directory, MLflow run) per value, one experiment for all.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mmt.atomic import atomic_write_text
from mmt.config import Config, ConfigError, load_config, save_config
from mmt.config.preemption import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER, parse_signals
from mmt.secrets import PASSWORD_ENV, REDACTED, USERNAME_ENV, redact, secret_patterns, split_userinfo
from mmt.slurm.template import render

DEFAULT_TEMPLATE = Path(__file__).resolve().with_name("job.sbatch.tmpl")  # package data; slurm/ links to it
CONFIG_NAME = "config.yaml"
ENV_NAME = "job.env"

# torchrun's own default; the configured preemption signal is taken out (the ranks handle it, not the agent).
_TORCHRUN_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")


@dataclass
class Member:
    """One job (or one array task): the overrides that make it, its resolved config and run directory."""

    label: str
    overrides: list[str]
    config: Config
    run_dir: Path

    @property
    def config_path(self) -> Path:
        return self.run_dir / CONFIG_NAME


@dataclass
class JobPlan:
    script: str
    members: list[Member]
    job_dir: Path  # where the script (and, for arrays, the logs and sweep.json) go
    env: dict[str, str] = field(default_factory=dict)  # exported to every rank, from job.env (mode 0600)

    @property
    def script_path(self) -> Path:
        return self.job_dir / "job.sbatch"

    @property
    def env_path(self) -> Path:
        return self.job_dir / ENV_NAME

    @property
    def is_array(self) -> bool:
        return len(self.members) > 1


def parse_sweeps(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``["train.optimizer.lr=1e-3,3e-3"]`` -> ``[("train.optimizer.lr", ["1e-3", "3e-3"])]``."""
    out = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        items = [v.strip() for v in values.split(",")]
        if not sep or not key.strip() or not all(items):
            raise ConfigError(
                f"--sweep {spec!r}", key or spec, "expected key=value1,value2,... (no empty values)"
            )
        if any(k == key.strip() for k, _ in out):
            raise ConfigError(f"--sweep {spec!r}", key, "swept twice")
        out.append((key.strip(), items))
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-") or "x"


def _forced_overrides(cfg: Config, source: str) -> list[str]:
    """What a Slurm job must set: resume from its own newest checkpoint, handle the configured signal."""
    out = []
    if cfg.train.resume not in ("", "auto"):
        raise ConfigError(
            source,
            "train.resume",
            f"{cfg.train.resume!r}: a Slurm job resumes with train.resume=auto, so that a requeued job continues "
            "from its own newest checkpoint",
        )
    out.append("train.resume=auto")
    wanted = f"SIG{cfg.slurm.signal}"
    try:
        have = [s.name for s in parse_signals(cfg.train.preempt_signals)]
    except ValueError as e:
        raise ConfigError(source, "train.preempt_signals", str(e)) from None
    if wanted not in have:
        out.append(f"train.preempt_signals={','.join([*have, wanted])}")
    return out


def expand_members(
    config_path: str | Path, overrides: list[str], sweeps: list[tuple[str, list[str]]], workdir: Path
) -> tuple[Config, list[Member]]:
    """The base config and every member's validated config; run directories become absolute (from ``workdir``)."""
    base = load_config(config_path, overrides)
    base_run_dir = (workdir / base.train.run_dir).resolve()
    forced = _forced_overrides(base, str(config_path))
    if not sweeps:
        ovr = [*overrides, *forced, f"train.run_dir={base_run_dir}"]
        return base, [Member("", ovr, load_config(config_path, ovr), base_run_dir)]
    members = []
    keys = [k for k, _ in sweeps]
    for values in itertools.product(*(vals for _, vals in sweeps)):
        label = "_".join(_slug(f"{k.rsplit('.', 1)[-1]}={v}") for k, v in zip(keys, values))
        run_dir = base_run_dir / label
        ovr = [
            *overrides,
            *(f"{k}={v}" for k, v in zip(keys, values)),
            *forced,
            f"tracking.run_name={base.tracking.run_name}-{label}",
            f"train.run_dir={run_dir}",
        ]
        members.append(Member(label, ovr, load_config(config_path, ovr), run_dir))
    labels = [m.label for m in members]
    if len(set(labels)) != len(labels):
        raise ConfigError("--sweep", ",".join(keys), f"values give clashing run directories: {labels}")
    return base, members


def job_environment(members: list[Member]) -> dict[str, str]:
    """What every rank exports: ``slurm.env``, plus the user-info of ``tracking.uri`` as MLflow's credential
    variables (the saved configs show that URI as ``***@``). Secrets, so they go to the 0600 ``job.env``."""
    env = dict(members[0].config.slurm.env)
    for m in members:
        _, user, password = split_userinfo(m.config.tracking.uri)
        if user and user != REDACTED:
            env.setdefault(USERNAME_ENV, user)
            if password:
                env.setdefault(PASSWORD_ENV, password)
            break
    return env


def _quote_list(items: list[str]) -> str:
    return " ".join(shlex.quote(i) for i in items)


def template_values(
    members: list[Member], job_dir: Path, workdir: Path, job_name: str, env: dict[str, str]
) -> dict[str, object]:
    """Everything the template needs, from the (shared) `slurm` section of the members' configs."""
    first = members[0].config
    s = first.slurm
    for m in members[1:]:
        if m.config.slurm != s:
            raise ConfigError(
                "--sweep", "slurm", "a sweep cannot change slurm.* settings (one job array, one shape)"
            )
    procs = s.gpus_per_node or s.ntasks_per_node
    torchrun = s.launch == "torchrun"
    array = len(members) > 1
    node_range = 0 < s.min_nodes < s.nodes
    return {
        "job_name": s.job_name or job_name,
        "nodes": f"{s.min_nodes}-{s.nodes}" if node_range else s.nodes,
        "node_range": node_range,
        "cpus_per_node": s.cpus_per_task * procs,
        "gpus_per_node": s.gpus_per_node,
        "procs_per_node": procs,
        "rdzv_timeout_s": max(m.config.train.rdzv_timeout_s for m in members),
        "sbatch_tasks_per_node": 1 if torchrun else procs,
        "sbatch_cpus_per_task": s.cpus_per_task * procs if torchrun else s.cpus_per_task,
        "cpus_per_task": s.cpus_per_task,
        "mem": s.mem,
        "partition": s.partition,
        "account": s.account,
        "qos": s.qos,
        "time": s.time,
        "array": f"0-{len(members) - 1}" if array else "",
        "workdir": shlex.quote(str(workdir)),
        "output": str(job_dir / ("slurm-%A_%a.out" if array else "slurm-%j.out")),
        "signal": s.signal,
        "signal_seconds": s.signal_seconds,
        "sbatch_args": list(s.sbatch_args),
        "configs": _quote_list([str(m.config_path) for m in members]),
        "run_dirs": _quote_list([str(m.run_dir) for m in members]),
        "setup": s.setup.rstrip("\n"),
        "env_file": shlex.quote(str(job_dir / ENV_NAME)) if env else "",
        "master_port": s.master_port,
        "launch": s.launch,
        "launch_srun": not torchrun,
        "launch_torchrun": torchrun,
        "trap_term": s.signal != "TERM",
        "python": shlex.quote(s.python or sys.executable),
        "entry": _quote_list(s.entry.split()),
        "torchrun_signals": ",".join(x for x in _TORCHRUN_SIGNALS if x != f"SIG{s.signal}"),
        "preempt_exit_code": PREEMPTED_EXIT_CODE,
        "preempt_marker": PREEMPTED_MARKER,
        "max_failures": s.max_failures,
    }


def plan_job(
    config_path: str | Path,
    overrides: list[str] = (),
    sweeps: list[tuple[str, list[str]]] = (),
    workdir: str | Path | None = None,
    template: str | Path | None = None,
) -> JobPlan:
    """Resolve the members and render the script; nothing is written (see `write_job`)."""
    workdir = Path(workdir or Path.cwd()).resolve()
    base, members = expand_members(config_path, list(overrides), list(sweeps), workdir)
    job_dir = members[0].run_dir.parent if len(members) > 1 else members[0].run_dir
    template = Path(template or DEFAULT_TEMPLATE)
    if not template.is_file():
        raise FileNotFoundError(f"sbatch template {template} not found (pass --template PATH)")
    env = job_environment(members)
    script = render(
        template.read_text(),
        template_values(members, job_dir, workdir, base.tracking.run_name, env),
        str(template),
    )
    return JobPlan(script, members, job_dir, env)


def _redact_override(override: str, cfg: Config) -> str:
    key, sep, value = override.partition("=")
    return f"{key}{sep}{redact({key: value}, secret_patterns(cfg.tracking.redact_keys))[key]}"


def write_job(plan: JobPlan) -> Path:
    """Write each member's resolved config (secrets redacted) into its run directory, the script (and
    sweep.json) atomically, and the job's environment to ``job.env``, readable by its owner only."""
    for m in plan.members:
        save_config(m.config, m.config_path)
    if plan.is_array:
        manifest = [
            {
                "index": i,
                "label": m.label,
                "run_dir": str(m.run_dir),
                "run_name": m.config.tracking.run_name,
                "overrides": [_redact_override(o, m.config) for o in m.overrides],
            }
            for i, m in enumerate(plan.members)
        ]
        atomic_write_text(plan.job_dir / "sweep.json", json.dumps(manifest, indent=2) + "\n")
    if plan.env:
        lines = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(plan.env.items()))
        atomic_write_text(plan.env_path, lines, mode=0o600)
    return atomic_write_text(plan.script_path, plan.script, mode=0o755)
