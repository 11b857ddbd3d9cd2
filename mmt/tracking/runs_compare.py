"""The comparison table of `mmt runs compare`: differing params, final / best metric values, throughput.

The table is plain data (`Comparison`) so the console view, the CSV and the JSON export all show the same
numbers; `to_records` is the single flat form both exports are written from.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run

from mmt.atomic import atomic_write_bytes
from mmt.tracking.runs import MFU, SAMPLES_PER_S, MetricPoint, metric_histories, metric_mode

THROUGHPUT_METRICS = (SAMPLES_PER_S, MFU)
_MISSING = "-"


@dataclass
class MetricStats:
    """Final (last step) and best value of one metric of one run; `mode` says which direction is best."""

    mode: str
    final: float | None = None
    final_step: int | None = None
    best: float | None = None
    best_step: int | None = None

    @classmethod
    def from_points(cls, points: Sequence[MetricPoint], mode: str) -> MetricStats:
        if not points:
            return cls(mode)
        last = points[-1]
        finite = [p for p in points if math.isfinite(p.value)]  # a NaN / inf (diverged step) is never "best"
        if not finite:
            return cls(mode, last.value, last.step)
        pick = min if mode == "min" else max
        best = pick(finite, key=lambda p: p.value)
        return cls(mode, last.value, last.step, best.value, best.step)


@dataclass
class RunRow:
    """One run of the comparison."""

    run_id: str
    run_name: str
    experiment_id: str
    status: str
    params: dict[str, str]  # the differing params only; a param the run did not log is absent
    metrics: dict[str, MetricStats]
    throughput: dict[str, float | None]  # median over the run's logged steps


@dataclass
class Comparison:
    """Everything `mmt runs compare` shows, plus the metric histories the plot is drawn from."""

    differing_params: list[str]
    metrics: list[str]
    rows: list[RunRow]
    histories: dict[str, dict[str, list[MetricPoint]]] = field(repr=False)


def differing_params(runs: Sequence[Run]) -> list[str]:
    """Param keys whose value is not the same in every run (a key missing from some run counts as differing)."""
    keys = sorted({k for r in runs for k in r.data.params})
    return [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]


def _median(points: Sequence[MetricPoint]) -> float | None:
    """Median over the run: robust to the slow first steps (compilation, warm-up) that would skew a mean."""
    return statistics.median(p.value for p in points) if points else None


def compare(client: MlflowClient, runs: Sequence[Run], metrics: Sequence[str]) -> Comparison:
    """Build the comparison of `runs` for the chosen metric keys (one history request per run and metric)."""
    keys = list(dict.fromkeys([*metrics, *THROUGHPUT_METRICS]))
    histories = metric_histories(client, runs, keys)
    diff = differing_params(runs)
    rows = []
    for run in runs:
        hist = histories[run.info.run_id]
        rows.append(
            RunRow(
                run_id=run.info.run_id,
                run_name=run.info.run_name or "",
                experiment_id=run.info.experiment_id,
                status=run.info.status,
                params={k: run.data.params[k] for k in diff if k in run.data.params},
                metrics={k: MetricStats.from_points(hist.get(k, []), metric_mode(k)) for k in metrics},
                throughput={k: _median(hist.get(k, [])) for k in THROUGHPUT_METRICS},
            )
        )
    return Comparison(diff, list(metrics), rows, histories)


def to_records(comp: Comparison) -> list[dict[str, object]]:
    """One flat dict per run: `params.<key>`, `<metric>.final|final_step|best|best_step`, throughput medians."""
    records = []
    for row in comp.rows:
        rec: dict[str, object] = {
            "run_id": row.run_id,
            "run_name": row.run_name,
            "experiment_id": row.experiment_id,
            "status": row.status,
        }
        rec.update({f"params.{k}": row.params.get(k) for k in comp.differing_params})
        for key in comp.metrics:
            stats = row.metrics[key]
            rec.update(
                {
                    f"{key}.final": stats.final,
                    f"{key}.final_step": stats.final_step,
                    f"{key}.best": stats.best,
                    f"{key}.best_step": stats.best_step,
                }
            )
        rec.update({f"{k}.median": row.throughput[k] for k in THROUGHPUT_METRICS})
        records.append(rec)
    return records


def write_csv(comp: Comparison, path: str | os.PathLike) -> Path:
    """The table as CSV, one row per run; a missing value is an empty cell."""
    records = to_records(comp)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(records[0]) if records else ["run_id"], lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: ("" if v is None else v) for k, v in rec.items()} for rec in records])
    return atomic_write_bytes(path, buf.getvalue().encode())


def to_json(comp: Comparison) -> dict[str, object]:
    """The table as a JSON-ready dict: which params differ, which metrics, and one flat record per run."""
    return {"differing_params": comp.differing_params, "metrics": comp.metrics, "runs": to_records(comp)}


def write_json(comp: Comparison, path: str | os.PathLike) -> Path:
    return atomic_write_bytes(path, (json.dumps(to_json(comp), indent=2) + "\n").encode())


def format_value(value: object) -> str:
    """Numbers to 4 significant digits for the console; None as '-'."""
    if value is None:
        return _MISSING
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
