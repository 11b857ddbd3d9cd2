"""Counting unreadable samples and shards: skip and log each one, fail clearly once too many are bad."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from mmt.data.samples import SampleFailure

log = logging.getLogger("mmt.data")


class DataError(RuntimeError):
    """Too much of the data is unreadable (or the data cannot be used at all); the message names examples."""


class FailureTracker:
    """Counts samples read and samples skipped; raises `DataError` when the skipped fraction passes ``threshold``.

    The fraction is enforced once ``check_after`` samples were read (one bad sample in the first batch must not
    kill a run) and always at the end of an epoch (`check`).
    """

    def __init__(self, threshold: float, check_after: int, what: str = "samples") -> None:
        self.threshold, self.check_after, self.what = threshold, check_after, what
        self.seen = 0
        self.failed = 0
        self.examples: list[str] = []

    def record(self, ok: int, failures: Iterable[SampleFailure]) -> None:
        failures = list(failures)
        for f in failures:
            log.warning("skipping unreadable sample: %s", f)
            if len(self.examples) < 5:
                self.examples.append(str(f))
        self.failed += len(failures)
        self.seen += ok + len(failures)
        if self.seen >= self.check_after:
            self.check()

    def check(self) -> None:
        if self.seen and self.failed / self.seen > self.threshold:
            raise DataError(
                f"{self.failed} of {self.seen} {self.what} unreadable ({self.failed / self.seen:.1%}), more than "
                f"data.max_failure_fraction={self.threshold}; e.g. " + " | ".join(self.examples)
            )

    def state(self) -> dict[str, int]:
        return {"seen": self.seen, "failed": self.failed}
