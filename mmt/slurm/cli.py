"""`mmt slurm`: render the sbatch template for a config, and submit it (or print it with --dry-run).

    mmt slurm submit CONFIG [key=value ...] --nodes N [--min-nodes M] --gpus-per-node G [--partition P --account A --qos Q
                     --time T --launch srun|torchrun --signal USR1|TERM|HUP --sweep key=v1,v2 ... --dry-run]
    mmt slurm wait JOB_ID [--timeout S]

Flags are `slurm.*` config overrides applied after the positional ones, so the config copied into the run
directory records how the job ran.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from mmt.cliargs import ArgumentParser
from mmt.config import ConfigError
from mmt.slurm.job import parse_sweeps, plan_job
from mmt.slurm.scontrol import wait_for_jobs
from mmt.slurm.submit import submit
from mmt.slurm.template import TemplateError

# flag -> slurm.* key; values are passed as YAML strings, except these integers.
_FLAGS = {
    "nodes": int,
    "min_nodes": int,
    "gpus_per_node": int,
    "ntasks_per_node": int,
    "cpus_per_task": int,
    "mem": str,
    "partition": str,
    "account": str,
    "qos": str,
    "time": str,
    "job_name": str,
    "launch": str,
    "signal": str,
    "signal_seconds": int,
    "max_failures": int,
}


def _submit_parser() -> argparse.ArgumentParser:
    s = ArgumentParser(
        prog="mmt slurm submit", description="render the sbatch template for CONFIG and submit it"
    )
    s.add_argument("config", help="experiment config (YAML/JSON)")
    s.add_argument("overrides", nargs="*", help="key=value config overrides")
    for name, typ in _FLAGS.items():
        s.add_argument(
            f"--{name.replace('_', '-')}", dest=name, type=typ, default=None, help=f"sets slurm.{name}"
        )
    s.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="job array: one run per value (repeat for a grid)",
    )
    s.add_argument(
        "--template",
        default=None,
        help="sbatch template (default: the one shipped in mmt, slurm/job.sbatch.tmpl in the repository)",
    )
    s.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    return s


def _wait_parser() -> argparse.ArgumentParser:
    w = ArgumentParser(
        prog="mmt slurm wait",
        description="poll a job until it (every array task) is finished; exit 0 if COMPLETED",
    )
    w.add_argument("job_id")
    w.add_argument("--timeout", type=float, default=24 * 3600.0)
    return w


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    for name, typ in _FLAGS.items():
        value = getattr(args, name)
        if value is None:
            continue
        if name == "signal":
            value = value.upper().removeprefix("SIG")
        out.append(f"slurm.{name}={value if typ is int else json.dumps(value)}")
    return out


def _submit(args: argparse.Namespace) -> int:
    plan = plan_job(
        args.config,
        [*args.overrides, *_flag_overrides(args)],
        parse_sweeps(args.sweep),
        template=args.template,
    )
    if args.dry_run:
        sys.stdout.write(plan.script)
        return 0

    job_id = submit(plan)
    print(f"submitted job {job_id}: {plan.script_path}")
    for i, m in enumerate(plan.members):
        prefix = f"  [{i}] " if plan.is_array else "  "
        print(f"{prefix}{m.run_dir}{'  (' + m.label + ')' if m.label else ''}")
    return 0


def _wait(args: argparse.Namespace) -> int:
    if not re.fullmatch(r"\d+(_\d+)?", args.job_id):
        print(
            f"mmt slurm wait: {args.job_id!r} is not a Slurm job id (digits, or JOB_TASK for an array task)",
            file=sys.stderr,
        )
        return 2
    if not args.timeout > 0:
        print(f"mmt slurm wait: --timeout {args.timeout}: expected seconds > 0", file=sys.stderr)
        return 2

    infos = wait_for_jobs(args.job_id, args.timeout, poll=2.0)
    for i in infos:
        print(f"{i.job_id} {i.state} exit={i.exit_code} restarts={i.restarts}")
    return 0 if all(i.state == "COMPLETED" for i in infos) else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"submit": (_submit_parser, _submit), "wait": (_wait_parser, _wait)}
    if not argv or argv[0] not in commands:
        print(__doc__.strip(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    make_parser, run = commands[argv[0]]
    args = make_parser().parse_intermixed_args(argv[1:])
    try:
        return run(args)
    except (ConfigError, TemplateError, FileNotFoundError, RuntimeError, TimeoutError) as e:
        print(f"mmt slurm: error: {e}", file=sys.stderr)
        return 2
