"""One logger interface for training: ``log(metrics, step)`` and ``close(status)``; backends sit behind it.

The trainer talks to a single `Logger`. On rank 0 it is a `MultiLogger` of the console line, a JSONL file in the
run directory and (by default) MLflow; on every other rank it is a `NullLogger` that only knows the MLflow run
id broadcast from rank 0, so no other rank ever opens a run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from mmt.secrets import PASSWORD_ENV, USERNAME_ENV, redact, redact_url

FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"


class TrackingError(Exception):
    """The tracking server refused or could not be reached when the run started: one line, no secrets."""


def describe_tracking_error(message: str, uri: str) -> str:
    """One line for an MLflow failure at ``uri``: what went wrong and what to set, credentials never shown."""
    where = f"MLflow at {redact_url(uri)}"
    if "error code 401" in message:
        user = os.environ.get(USERNAME_ENV)
        who = f"as user {user!r}" if user else f"without credentials ({USERNAME_ENV} is not set)"
        return (
            f"{where}: authentication failed {who} (HTTP 401); set {USERNAME_ENV} and {PASSWORD_ENV} "
            "to a valid user and password"
        )
    if "error code 403" in message:
        return f"{where}: permission denied for user {os.environ.get(USERNAME_ENV)!r} (HTTP 403)"
    first = redact_url(" ".join(message.split()) or "unknown error")
    return f"{where}: {first[:300]}"


class Logger(Protocol):
    run_id: str | None

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...

    def flush(self) -> None: ...

    def close(self, status: str = FINISHED) -> None: ...


class NullLogger:
    """Accepts everything, records nothing: non-zero ranks, and runs with tracking.backend=none."""

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self, status: str = FINISHED) -> None:
        pass


def format_metrics(metrics: Mapping[str, float], step: int, total: int | None = None) -> str:
    """``step 40/100 | loss 2.3104 | lr 9.8e-04 | ...``: short names, compact numbers."""
    head = f"step {step}/{total}" if total else f"step {step}"
    parts = [head]
    for k, v in metrics.items():
        name = k.split("/", 1)[1] if k.startswith("train/") else k
        if isinstance(v, float) and (abs(v) >= 1e4 or (abs(v) < 1e-3 and v != 0)):
            parts.append(f"{name} {v:.3e}")
        elif isinstance(v, float):
            parts.append(f"{name} {v:.4f}")
        else:
            parts.append(f"{name} {v}")
    return " | ".join(parts)


class ConsoleLogger(NullLogger):
    """One line per `log` call on stdout (through tqdm when a bar is live, so the bar stays intact)."""

    def __init__(self, total_steps: int | None = None, stream: Any = None) -> None:
        super().__init__()
        self.total_steps = total_steps
        self.stream = stream or sys.stdout

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        line = format_metrics(metrics, step, self.total_steps)
        try:
            tqdm.write(line, file=self.stream)
        except ImportError:  # pragma: no cover - tqdm is a dependency
            print(line, file=self.stream, flush=True)


class JsonlLogger(NullLogger):
    """Appends ``{"step": s, "time": t, metrics...}`` lines to a file: greppable, and read by tests and tools."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        row = {"step": step, "time": time.time()}
        row.update(
            {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        )
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def flush(self) -> None:
        self._f.flush()

    def close(self, status: str = FINISHED) -> None:
        if not self._f.closed:
            self._f.close()


class RedactingLogger:
    """Passes everything on with secrets replaced (`mmt.secrets.redact`): params and tags by key pattern
    and URL user-info, string metric values by URL user-info. The one door to every backend on rank 0."""

    def __init__(self, inner: Logger, patterns: tuple[str, ...]) -> None:
        self.inner, self.patterns, self._redact = inner, patterns, redact

    @property
    def run_id(self) -> str | None:
        return self.inner.run_id

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.inner.log({k: self._redact(v, ()) for k, v in metrics.items()}, step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.inner.log_params(self._redact(dict(params), self.patterns))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.inner.set_tags(self._redact(dict(tags), self.patterns))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.inner.log_artifact(path, artifact_path)

    def flush(self) -> None:
        self.inner.flush()

    def close(self, status: str = FINISHED) -> None:
        self.inner.close(status)


class MultiLogger:
    """Fans every call out to several loggers; ``run_id`` is the first backend's that has one."""

    def __init__(self, *loggers: Logger) -> None:
        self.loggers = list(loggers)

    @property
    def run_id(self) -> str | None:
        return next((lg.run_id for lg in self.loggers if lg.run_id), None)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log(metrics, step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        for lg in self.loggers:
            lg.log_params(params)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for lg in self.loggers:
            lg.set_tags(tags)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        for lg in self.loggers:
            lg.log_artifact(path, artifact_path)

    def flush(self) -> None:
        for lg in self.loggers:
            lg.flush()

    def close(self, status: str = FINISHED) -> None:
        errors = []
        for lg in self.loggers:
            try:
                lg.close(status)
            except Exception as e:  # noqa: BLE001 - close every backend, then report
                errors.append(e)
        if errors:
            raise errors[0]
