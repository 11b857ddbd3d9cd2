"""Graceful preemption: a signal only sets a flag; the training loop saves at the next step boundary and exits.

Handlers never touch collectives or files (that could deadlock or corrupt a save in flight). The loop calls
`PreemptionFlag.should_stop`, which all-reduces the flag so that when one rank got the signal every rank stops
at the same step, saves its shard of the checkpoint, and the job exits with `PREEMPTED_EXIT_CODE`.

Launchers that re-map exit codes (torchrun reports any worker failure as 1) lose that code, so the trainer also
leaves ``<run_dir>/preempted.json``; `exited_due_to_preemption` checks both, and a requeue script needs nothing
else.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import torch

from mmt.atomic import atomic_write_text
from mmt.config.preemption import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER
from mmt.training.distributed import any_rank


class PreemptionFlag:
    """Installs handlers for ``signals``; `should_stop` is the collective check done once per step."""

    def __init__(self, signals: list[signal.Signals]) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)

    def should_stop(self, device: torch.device) -> bool:
        return any_rank(self.received is not None, device)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def shield(self) -> None:
        """After a complete preemption save: ignore SIGTERM, SIGHUP and the preemption signals from now until the
        process exits, so the rest of an orderly shutdown (closing the MLflow run with its queued metrics, the
        last log lines, exit code 75) always happens.

        Why: under ``srun --kill-on-bad-exit=1`` the first rank to exit with `PREEMPTED_EXIT_CODE` makes srun
        SIGTERM the others, which are by then only shutting down. A rank that crashes for real still brings the
        job down: the others are then still training, not shielded, and die on that SIGTERM.
        """
        for sig in {*self._previous, signal.SIGTERM, signal.SIGHUP}:
            signal.signal(sig, signal.SIG_IGN)
        self._previous.clear()


def write_marker(run_dir: str | Path, step: int, checkpoint: str, signal_name: str) -> Path:
    info = {
        "step": step,
        "checkpoint": checkpoint,
        "signal": signal_name,
        "time": time.time(),
        "exit_code": PREEMPTED_EXIT_CODE,
    }
    return atomic_write_text(Path(run_dir) / PREEMPTED_MARKER, json.dumps(info, indent=2) + "\n")


def clear_marker(run_dir: str | Path) -> None:
    (Path(run_dir) / PREEMPTED_MARKER).unlink(missing_ok=True)


def exited_due_to_preemption(exit_code: int | None = None, run_dir: str | Path | None = None) -> bool:
    """Whether a finished `mmt train` stopped because it was preempted (and saved a checkpoint to resume from).

    True when ``exit_code`` is `PREEMPTED_EXIT_CODE`, or when ``run_dir`` holds the marker written after the
    preemption checkpoint completed (the marker is removed when a run finishes normally).
    """
    if exit_code is not None and exit_code == PREEMPTED_EXIT_CODE:
        return True
    return run_dir is not None and (Path(run_dir) / PREEMPTED_MARKER).is_file()


def preemption_info(run_dir: str | Path) -> dict[str, Any] | None:
    p = Path(run_dir) / PREEMPTED_MARKER
    return json.loads(p.read_text()) if p.is_file() else None
