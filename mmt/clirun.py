"""Running an `mmt` subcommand: mmt's own errors become one redacted line and exit code 2, anything else a traceback.

The dispatcher (`mmt.cli`) and the entry points that bypass it (``python -m mmt.train`` under torchrun or the
deepspeed launcher) all run their command through `run_command`, so every way of starting one reports errors alike.
Kept apart from the argument parser so that ``mmt --help`` imports neither argparse nor any area's code.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from mmt.secrets import redact_error_text

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
    text = str(e).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: its last line is the error itself
        text = text.splitlines()[-1].split(": ", 1)[-1]
    message = " ".join(text.split()) or type(e).__name__
    return f"mmt {command}: {kind}: {redact_error_text(message)}"


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
