"""The `mmt` command: a thin dispatcher to each area's own entry point, imported only when used."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

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


# mmt's own errors (module, class, how the line names it): each is bad input or an unusable resource that the
# message names, so the command prints that one line and exits 2 instead of a traceback. Checked by module name
# so that a command never imports the heavy modules of another area just to catch their errors.
ERRORS: tuple[tuple[str, str, str], ...] = (
    ("mmt.config.errors", "ConfigError", "config error"),
    ("mmt.data.faults", "DataError", "data error"),
    ("mmt.data.storage", "StorageError", "storage error"),
    ("mmt.ckpt.layout", "CheckpointError", "checkpoint error"),
    ("mmt.tracking.logger", "TrackingError", "tracking error"),
    ("mmt.tracking.runs", "RunsError", "error"),
    ("mmt.slurm.scontrol", "SlurmError", "slurm error"),
    ("mmt.slurm.template", "TemplateError", "template error"),
    ("mmt.export.exporter", "ExportError", "export error"),
    ("mmt.inference.media", "InputError", "input error"),
    ("mmt.data.build.inputs", "InputError", "input error"),
    ("mmt.training.demo", "DemoError", "error"),
)


def error_kind(e: BaseException) -> str | None:
    """How the one-line message names ``e`` when it is one of mmt's own errors, else None (a real bug: traceback)."""
    for module, cls, kind in ERRORS:
        loaded = sys.modules.get(module)  # an error of a class from a module never imported cannot happen
        if loaded is not None and isinstance(e, getattr(loaded, cls)):
            return kind
    return None


def error_line(command: str, kind: str, e: BaseException) -> str:
    """``mmt train: data error: <message>``: one line, with secrets (URL user-info, secret KEY=value) redacted."""
    from mmt.config.secrets import redact_error_text

    text = str(e).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: its last line is the error itself
        text = text.splitlines()[-1].split(": ", 1)[-1]
    message = " ".join(text.split()) or type(e).__name__
    return f"mmt {command}: {kind}: {redact_error_text(message)}"


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


def run_command(command: str, func: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """Run one subcommand; mmt's own errors become `error_line` and exit code 2, anything else a traceback.

    Entry points that bypass the dispatcher (``python -m mmt.train`` under torchrun / the deepspeed launcher) call
    this too, so every way of starting a command reports errors alike."""
    try:
        return int(func(argv) or 0)
    except Exception as e:
        kind = error_kind(e)
        if kind is None:
            raise
        print(error_line(command, kind, e), file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
