"""MLflow behind the `Logger` interface, off the training step's critical path.

`log` only appends to a queue; a background thread turns queued metrics into `log_batch` calls (<= 1000 metrics
each) at least every ``flush_interval_s`` seconds, so a slow tracking server never stalls a step. Params and tags
go through the same thread in order. `close` drains the queue and sets the run's final status; a process that
exits without closing (an exception escaping everything, `sys.exit`) is marked FAILED by an ``atexit`` hook, so a
crashed run is never left RUNNING.

Default store: an embedded SQLite file ``sqlite:///<cwd>/mlflow.db`` shared by every run started from the same
working directory; ``MLFLOW_TRACKING_URI`` or ``tracking.uri`` point at a server instead. A resumed run passes the
run id saved in its checkpoint and keeps logging into the same MLflow run.
"""

from __future__ import annotations

import atexit
import os
import queue
import re
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmt.secrets import tracking_credentials
from mmt.tracking.logger import FAILED, FINISHED, TrackingError, describe_tracking_error
from mmt.tracking.uri import resolve_tracking_uri

MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_PARAM_VALUE = 6000


_BAD_NAME_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")


def metric_name(name: str) -> str:
    """MLflow accepts only ``[A-Za-z0-9_-. :/]`` in names: ``recall@1`` becomes ``recall_at_1``."""
    return _BAD_NAME_CHARS.sub("_", name.replace("@", "_at_"))


def default_artifact_location(uri: str) -> str | None:
    """For a SQLite store, artifacts live beside the database (``<db dir>/mlruns``, MLflow's usual local folder);
    a tracking server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlruns").resolve().as_uri()
    return None


class MLflowLogger:
    """An MLflow run fed from a background thread. Create on rank 0 only."""

    def __init__(
        self,
        experiment: str,
        run_name: str,
        *,
        uri: str = "",
        run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        artifact_location: str = "",
        flush_interval_s: float = 5.0,
    ) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.uri = tracking_credentials(resolve_tracking_uri(uri))  # user-info -> MLFLOW_TRACKING_* vars
        self.client = MlflowClient(tracking_uri=self.uri)
        self.resumed = False
        try:
            self.experiment_id = self._experiment_id(
                experiment, artifact_location or default_artifact_location(self.uri)
            )
            self.run_id = self._start_run(run_id, run_name, dict(tags or {}))
        except MlflowException as e:  # a wrong password, a missing permission: one line, before any work
            raise TrackingError(describe_tracking_error(e.message, self.uri)) from None
        self.flush_interval_s = flush_interval_s
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._worker, name="mlflow-logger", daemon=True)
        self._thread.start()
        atexit.register(self._atexit)

    # -- run lifecycle --------------------------------------------------------------------------------------------
    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        except Exception:  # another run created it at the same moment
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def _start_run(self, run_id: str | None, run_name: str, tags: dict[str, Any]) -> str:
        if run_id:
            try:
                run = self.client.get_run(run_id)
            except Exception as e:  # noqa: BLE001 - the store moved or was wiped: keep training, say so
                warnings.warn(
                    f"MLflow run {run_id} not found in {self.uri} ({type(e).__name__}); starting a new "
                    "run tagged mmt.resumed_from_run_id",
                    stacklevel=2,
                )
                tags["mmt.resumed_from_run_id"] = run_id
            else:
                self.client.update_run(run.info.run_id, status="RUNNING")
                self.resumed = True
                self._send_tags(run.info.run_id, tags)
                return run.info.run_id
        run = self.client.create_run(
            self.experiment_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()}
        )
        return run.info.run_id

    # -- Logger interface -----------------------------------------------------------------------------------------
    def log(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._queue.put(
            ("metrics", [(k, float(v), now, int(step)) for k, v in metrics.items() if v is not None])
        )

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params are immutable in MLflow: on a resumed run only new keys are logged; changed values are recorded
        in the tag ``mmt.resume_changed_params`` instead of failing the run."""
        self._queue.put(("params", dict(params)))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._queue.put(("tags", dict(tags)))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._queue.put(("artifact", (str(path), artifact_path)))

    def flush(self, timeout: float = 60.0) -> None:
        """Block until everything queued so far has been sent."""
        done = threading.Event()
        self._queue.put(("flush", done))
        done.wait(timeout)

    def close(self, status: str = FINISHED) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(("stop", None))
        self._thread.join(timeout=120)
        try:
            self.client.set_terminated(self.run_id, status=status)
        finally:
            atexit.unregister(self._atexit)
        if self._error is not None:
            warnings.warn(f"MLflow logging failed during the run: {self._error!r}", stacklevel=2)

    def _atexit(self) -> None:
        # Reached only when the process exits without `close`: the run did not end normally.
        if not self._closed:
            self.close(FAILED)

    # -- background thread --------------------------------------------------------------------------------------
    def _worker(self) -> None:
        pending: list[tuple[str, float, int, int]] = []
        last_send = time.monotonic()
        while True:
            timeout = max(0.05, self.flush_interval_s - (time.monotonic() - last_send))
            try:
                kind, payload = self._queue.get(timeout=timeout)
            except queue.Empty:
                kind, payload = "tick", None
            try:
                if kind == "metrics":
                    pending.extend(payload)
                    if (
                        len(pending) < MAX_METRICS_PER_BATCH
                        and time.monotonic() - last_send < self.flush_interval_s
                    ):
                        continue
                # Anything other than a metric keeps the order: send the metrics queued before it first.
                self._send_metrics(pending)
                pending = []
                last_send = time.monotonic()
                if kind == "params":
                    self._send_params(payload)
                elif kind == "tags":
                    self._send_tags(self.run_id, payload)
                elif kind == "artifact":
                    self.client.log_artifact(self.run_id, payload[0], payload[1])
                elif kind == "flush":
                    payload.set()
                elif kind == "stop":
                    return
            except Exception as e:  # noqa: BLE001 - tracking must never kill training; reported at close
                if self._error is None:
                    print(f"mmt: MLflow logging error (training continues): {e!r}", file=sys.stderr)
                self._error = e
                if kind == "flush":
                    payload.set()
                if kind == "stop":
                    return

    def _send_metrics(self, rows: list[tuple[str, float, int, int]]) -> None:
        from mlflow.entities import Metric

        for i in range(0, len(rows), MAX_METRICS_PER_BATCH):
            chunk = [Metric(k, v, ts, step) for k, v, ts, step in rows[i : i + MAX_METRICS_PER_BATCH]]
            self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)

    def _send_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params if self.resumed else {}
        changed = {
            k: (existing[k], _param_str(v))
            for k, v in params.items()
            if k in existing and existing[k] != _param_str(v)
        }
        new = [Param(k, _param_str(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[i : i + MAX_PARAMS_PER_BATCH], synchronous=True)
        if changed:
            text = "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in sorted(changed.items()))
            self._send_tags(self.run_id, {"mmt.resume_changed_params": text[:MAX_PARAM_VALUE]})

    def _send_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:MAX_PARAM_VALUE]) for k, v in tags.items()]
        for i in range(0, len(items), MAX_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=items[i : i + MAX_TAGS_PER_BATCH], synchronous=True)


def _param_str(v: Any) -> str:
    s = "None" if v is None else str(v)
    return s[:MAX_PARAM_VALUE]
