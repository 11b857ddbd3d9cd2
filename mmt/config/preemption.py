"""The preemption contract between a training run and the scheduler that requeues it: the exit code and marker
file a preempted run leaves (`mmt.training.preemption` writes them, the Slurm job script renders them into its
requeue check) and the ``train.preempt_signals`` names as signals.

It sits in the config layer so that rendering a job (`mmt.slurm`) and training agree on it without the launcher
importing the trainer.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): "temporary failure; the user is invited to retry"
PREEMPTED_MARKER = "preempted.json"


def parse_signals(names: Sequence[str]) -> list[signal.Signals]:
    """``["SIGTERM", "USR1"]`` -> signal numbers; ValueError naming an unknown name as given (the one parser:
    the config check, the trainer and `mmt slurm` all call it)."""
    out = []
    for name in (s.strip().upper() for s in names if s.strip()):
        try:
            out.append(signal.Signals[name if name.startswith("SIG") else "SIG" + name])
        except KeyError:
            raise ValueError(f"unknown signal {name!r}") from None
    return out
