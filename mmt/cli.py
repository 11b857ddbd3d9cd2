"""The `mmt` command: a thin dispatcher to each area's own entry point, imported only when used."""

from __future__ import annotations

import importlib
import sys

from mmt.clirun import run_command

# subcommand -> (module, function taking argv and returning an exit code, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("mmt.training.cli", "train_main", "train a model (single process, torchrun, deepspeed, srun)"),
    "eval": ("mmt.training.cli", "eval_main", "evaluate a checkpoint"),
    "demo": (
        "mmt.training.demo",
        "main",
        "build the demo dataset and run the tiny tri-modal pretraining demo",
    ),
    "shards": ("mmt.data.cli", "main", "build, inspect and demo WebDataset shards"),
    "slurm": ("mmt.slurm.cli", "main", "render and submit sbatch jobs"),
    "ckpt": ("mmt.ckpt.cli", "main", "inspect, convert and reshard checkpoints"),
    "runs": ("mmt.tracking.runs_cli", "main", "list and compare MLflow runs"),
    "model": ("mmt.model.cli", "main", "build a model from a config and print its size and FLOPs"),
    "export": ("mmt.export.cli", "main", "export trained towers to ONNX / TorchScript / torch.export (int8)"),
}


def _usage() -> str:
    lines = ["usage: mmt COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mmt: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    return run_command(name, getattr(importlib.import_module(module), func), rest)


if __name__ == "__main__":
    sys.exit(main())
