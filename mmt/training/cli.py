"""``mmt train CONFIG [key=value ...]`` and ``mmt eval CONFIG --checkpoint DIR [key=value ...]``.

Thin: parse, load the typed config, hand over to `mmt.training.trainer` / `mmt.training.evaluation_run`.
The same command line works alone, under ``torchrun``, under the ``deepspeed`` launcher (which appends
``--local_rank=N``) and under ``srun``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mmt.cliargs import ArgumentParser
from mmt.clirun import run_command
from mmt.config import load_config
from mmt.training.evaluation_run import evaluate_checkpoint
from mmt.training.trainer import train


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description=description)
    p.add_argument(
        "config", help="run config (YAML/JSON file or shipped name), e.g. demo, configs/train/demo.yaml"
    )
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 train.zero_stage=3"
    )
    # The deepspeed launcher passes --local_rank; the rank is read from the environment anyway.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _split_overrides(args: argparse.Namespace, extra: list[str]) -> list[str]:
    bad = [x for x in extra if "=" not in x]
    if bad:
        raise SystemExit(f"unrecognised arguments: {' '.join(bad)} (overrides are key=value)")
    return list(args.overrides) + extra


def train_main(argv: list[str] | None = None) -> int:
    """Train; exit code 0 when done, `PREEMPTED_EXIT_CODE` after a preemption save, 2 for bad input (one line)."""
    return run_command("train", _train, sys.argv[1:] if argv is None else argv)


def _train(argv: list[str]) -> int:
    args, extra = _parser("mmt train", "Train a multimodal model.").parse_known_args(argv)
    cfg = load_config(args.config, _split_overrides(args, extra))

    result = train(cfg, source=args.config)
    if result.exit_code == 0 and _is_rank0():
        summary = {k: round(v, 4) for k, v in result.eval_metrics.items()}
        print(
            f"mmt: done at step {result.step}; checkpoint {result.checkpoint}; MLflow run {result.run_id}"
            + (f"; eval {json.dumps(summary)}" if summary else ""),
            flush=True,
        )
    elif result.preempted and _is_rank0():
        # Printed after the MLflow run was closed: the shutdown ran to its end (not cut by a launcher's SIGTERM).
        print(f"mmt: preemption shutdown complete; exit {result.exit_code}", flush=True)
    return result.exit_code


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def eval_main(argv: list[str] | None = None) -> int:
    """Evaluate a checkpoint on ``data.val_urls``; prints the metrics as JSON (rank 0); 2 for bad input."""
    return run_command("eval", _eval, sys.argv[1:] if argv is None else argv)


def _eval(argv: list[str]) -> int:
    p = _parser("mmt eval", "Evaluate a checkpoint on the held-out set.")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a step_XXXXXXXX folder, a checkpoints/ folder or a run folder (newest complete checkpoint)",
    )
    p.add_argument("--output", default="", help="also write the metrics JSON here")
    p.add_argument("--mlflow", action="store_true", help="log the metrics into the checkpoint's MLflow run")
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle the checkpoint fully (may run code stored in it); default: tensors and DeepSpeed's classes only",
    )
    args, extra = p.parse_known_args(argv)
    cfg = load_config(args.config, _split_overrides(args, extra))

    metrics = evaluate_checkpoint(
        cfg,
        args.checkpoint,
        output=args.output,
        log_mlflow=args.mlflow,
        source=args.config,
        trust_checkpoint=args.trust_checkpoint,
    )
    if metrics is not None:
        print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0
