"""`mmt runs`: list, compare and pick the best of any MLflow runs (`mmt train`'s or any other program's).

Thin layer over `mmt.tracking.runs` (queries), `runs_compare` (the table and its exports) and `runs_plot`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from sqlalchemy.exc import SQLAlchemyError

from mmt.cliargs import ArgumentParser
from mmt.secrets import redact_url
from mmt.tracking import runs_plot
from mmt.tracking.logger import describe_tracking_error
from mmt.tracking.runs import (
    DEFAULT_METRIC_CAP,
    TAG_CHECKPOINT_DIR,
    TAG_RUN_DIR,
    RunsError,
    default_metrics,
    duration_s,
    experiments_by_id,
    find_experiment,
    get_runs,
    last_step,
    metric_histories,
    metric_mode,
    open_client,
    search_runs,
)
from mmt.tracking.runs_compare import (
    THROUGHPUT_METRICS,
    MetricStats,
    compare,
    format_value,
    write_csv,
    write_json,
)
from mmt.tracking.uri import resolve_tracking_uri

LIST_DEFAULT_METRIC_COLUMNS = 5  # `list` is one line per run: cap the default metric columns to stay readable


def _note(note: str | None) -> None:
    """Notes go to stderr so that stdout stays the table alone (scripts parse it)."""
    if note:
        print(f"note: {note}", file=sys.stderr)


def _metric_list(text: str | None) -> list[str] | None:
    return [m.strip() for m in text.split(",") if m.strip()] if text else None


def _parser() -> argparse.ArgumentParser:
    common = ArgumentParser(add_help=False)
    common.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db like `mmt train`)",
    )
    p = ArgumentParser(
        prog="mmt runs",
        description="List and compare MLflow runs (logged by mmt train or any other program).",
    )
    sub = p.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("list", parents=[common], help="recent runs: status, duration, steps, key metrics")
    ls.add_argument("--experiment", help="only this experiment (default: all experiments)")
    ls.add_argument("--filter", default="", help="MLflow search filter, e.g. \"params.train.seed = '1'\"")
    ls.add_argument("--limit", type=int, default=20, help="how many of the newest runs (default 20)")
    ls.add_argument(
        "--metrics", help="comma-separated metric keys (default: the metrics the runs logged, mmt's first)"
    )

    cmp_ = sub.add_parser("compare", parents=[common], help="table of differing params, metrics, throughput")
    cmp_.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="runs to compare (or use --experiment)")
    cmp_.add_argument("--experiment", help="compare the runs of this experiment (newest first)")
    cmp_.add_argument(
        "--filter", default="", help="with --experiment: \"params.model.attention.kind = 'linear'\""
    )
    cmp_.add_argument("--limit", type=int, default=20, help="with --experiment: at most this many runs")
    cmp_.add_argument(
        "--metrics",
        help=f"comma-separated metric keys (default: up to {DEFAULT_METRIC_CAP} the runs logged, mmt's first)",
    )
    cmp_.add_argument("--plot", metavar="OUT.png", help="draw the metric curves of every run to this PNG")
    cmp_.add_argument("--x", choices=("step", "time"), default="step", help="plot x axis: step or wall-clock")
    cmp_.add_argument(
        "--smooth", type=float, default=0.0, help="plot EMA smoothing weight in [0, 1) (0 = off)"
    )
    cmp_.add_argument(
        "--plot-size", metavar="WxH", help="plot size in pixels (default 1000 x 320 per metric)"
    )
    cmp_.add_argument("--csv", metavar="OUT.csv", help="export the table as CSV")
    cmp_.add_argument("--json", metavar="OUT.json", help="export the table as JSON")

    best = sub.add_parser("best", parents=[common], help="the best run by a metric, and its checkpoint")
    best.add_argument("--experiment", required=True)
    best.add_argument("--metric", required=True, help="metric key, e.g. val/recall@1")
    best.add_argument("--mode", choices=("max", "min"), help="default: min for losses / errors, else max")
    best.add_argument(
        "--by",
        choices=("final", "best"),
        default="final",
        help="rank runs by the metric's final value (default) or by the best value it reached",
    )
    best.add_argument("--filter", default="")
    best.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def _format_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{sec:02d}s" if hours else f"{minutes}m{sec:02d}s"


def _format_time(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _cmd_list(args: argparse.Namespace) -> int:
    client = open_client(resolve_tracking_uri(args.tracking_uri))
    experiments = experiments_by_id(client)
    ids = [find_experiment(client, args.experiment).experiment_id] if args.experiment else list(experiments)
    runs = search_runs(client, ids, args.filter, limit=args.limit) if ids else []
    if not runs:
        print(
            f"no runs found at {client.tracking_uri}"
            + (f" in experiment {args.experiment!r}" if args.experiment else "")
        )
        return 0
    metrics = _metric_list(args.metrics)
    if metrics is None:
        metrics, note = default_metrics(runs, cap=LIST_DEFAULT_METRIC_COLUMNS)
        _note(note)
    now_ms = int(time.time() * 1000)
    rows = [["run_id", "name", "experiment", "status", "started", "duration", "steps", *metrics]]
    for r in runs:
        exp = experiments.get(r.info.experiment_id)
        rows.append(
            [
                r.info.run_id,
                r.info.run_name or "",
                exp.name if exp else r.info.experiment_id,
                r.info.status,
                _format_time(r.info.start_time),
                _format_duration(duration_s(r, now_ms)),
                format_value(last_step(r)),
                *(format_value(r.data.metrics.get(m)) for m in metrics),
            ]
        )
    print(_format_table(rows))
    return 0


def _stats_cell(stats: MetricStats, which: str) -> str:
    value, step = (stats.final, stats.final_step) if which == "final" else (stats.best, stats.best_step)
    return "-" if value is None else f"{format_value(value)} (step {step})"


def _cmd_compare(args: argparse.Namespace) -> int:
    if bool(args.run_ids) == bool(args.experiment):
        raise RunsError("compare needs either RUN_ID... or --experiment NAME (not both)")
    if args.filter and not args.experiment:
        raise RunsError("--filter selects runs of an experiment: use it with --experiment")
    client = open_client(resolve_tracking_uri(args.tracking_uri))
    if args.experiment:
        exp = find_experiment(client, args.experiment)
        runs = search_runs(client, [exp.experiment_id], args.filter, limit=args.limit)
        if not runs:
            where = f" matching --filter {args.filter!r}" if args.filter else ""
            raise RunsError(f"no runs in experiment {args.experiment!r}{where} at {client.tracking_uri}")
    else:
        runs = get_runs(client, list(dict.fromkeys(args.run_ids)))
    # validate plot options before the (slow) history requests

    size = runs_plot.parse_size(args.plot_size) if args.plot_size else None
    if not 0.0 <= args.smooth < 1.0:
        raise RunsError(f"invalid --smooth {args.smooth}: expected an EMA weight in [0, 1)")

    metrics = _metric_list(args.metrics)
    if metrics is None:
        metrics, note = default_metrics(runs)
        _note(note)
        if not metrics:
            raise RunsError("these runs logged no metrics to compare")
    logged = {k for r in runs for k in r.data.metrics}
    unknown = [m for m in metrics if m not in logged]
    if unknown:
        raise RunsError(
            f"metric(s) {', '.join(map(repr, unknown))} not logged by any of the runs "
            f"(logged: {', '.join(sorted(logged)) or 'none'})"
        )
    comp = compare(client, runs, metrics)

    table = [["", *(f"{r.run_name} ({r.run_id[:8]})" for r in comp.rows)]]
    table.append(["run_id", *(r.run_id for r in comp.rows)])
    table.append(["status", *(r.status for r in comp.rows)])
    for key in comp.differing_params:
        table.append([f"params.{key}", *(format_value(r.params.get(key)) for r in comp.rows)])
    for key in comp.metrics:
        mode = metric_mode(key)
        table.append([f"{key} final", *(_stats_cell(r.metrics[key], "final") for r in comp.rows)])
        table.append([f"{key} best ({mode})", *(_stats_cell(r.metrics[key], "best") for r in comp.rows)])
    for key in THROUGHPUT_METRICS:
        table.append([f"{key} median", *(format_value(r.throughput[key]) for r in comp.rows)])
    if not comp.differing_params:
        print("(all params are equal across these runs)")
    print(_format_table(table))

    if args.csv:
        print(f"wrote {write_csv(comp, args.csv)}")
    if args.json:
        print(f"wrote {write_json(comp, args.json)}")
    if args.plot:
        start = {r.info.run_id: r.info.start_time for r in runs}
        out = runs_plot.plot_comparison(comp, args.plot, start, x=args.x, smooth=args.smooth, size=size)
        print(f"wrote {out}")
    return 0


def _latest_checkpoint(checkpoint_dir: str | None) -> str | None:
    """`<checkpoint_dir>/<tag>` named by the `latest` file, when that folder is readable from here."""
    if not checkpoint_dir:
        return None
    latest = Path(checkpoint_dir) / "latest"
    try:
        tag = latest.read_text().strip()
    except OSError:
        return None
    return str(Path(checkpoint_dir) / tag) if tag else None


def _pick_best(client, runs: list[Run], metric: str, mode: str, by: str) -> tuple[Run, float, int | None]:
    """The run with the best final (or best-ever) value of `metric`; the first (newest) wins a tie."""
    candidates: list[tuple[Run, float, int | None]] = []
    if by == "final":
        for r in runs:
            steps = {m.key: m.step for m in r.data.to_proto().metrics}
            if math.isfinite(r.data.metrics[metric]):  # a run that ended on NaN is not a candidate
                candidates.append((r, r.data.metrics[metric], steps.get(metric)))
    else:
        histories = metric_histories(client, runs, [metric])
        for r in runs:
            stats = MetricStats.from_points(histories[r.info.run_id].get(metric, []), mode)
            if stats.best is not None:
                candidates.append((r, stats.best, stats.best_step))
    if not candidates:
        raise RunsError(f"every run's {by} value of {metric!r} is NaN or infinite")
    sign = 1.0 if mode == "max" else -1.0
    return max(candidates, key=lambda c: sign * c[1])


def _cmd_best(args: argparse.Namespace) -> int:
    client = open_client(resolve_tracking_uri(args.tracking_uri))
    exp = find_experiment(client, args.experiment)
    runs = search_runs(client, [exp.experiment_id], args.filter)
    with_metric = [r for r in runs if args.metric in r.data.metrics]
    if not with_metric:
        logged = sorted({k for r in runs for k in r.data.metrics})
        raise RunsError(
            f"no run of experiment {args.experiment!r} logged metric {args.metric!r} "
            f"({len(runs)} runs; metrics logged: {', '.join(logged) or 'none'})"
        )
    mode = args.mode or metric_mode(args.metric)
    run, value, step = _pick_best(client, with_metric, args.metric, mode, args.by)
    ckpt_dir = run.data.tags.get(TAG_CHECKPOINT_DIR)
    result = {
        "experiment": args.experiment,
        "metric": args.metric,
        "mode": mode,
        "by": args.by,
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "value": value,
        "step": step,
        "run_dir": run.data.tags.get(TAG_RUN_DIR),
        "checkpoint_dir": ckpt_dir,
        "latest_checkpoint": _latest_checkpoint(ckpt_dir),
        "runs_considered": len(with_metric),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"best of {len(with_metric)} runs in {args.experiment!r} by {args.by} {args.metric} ({mode}):")
    for key in ("run_id", "run_name", "value", "step", "run_dir", "checkpoint_dir", "latest_checkpoint"):
        value_text = format_value(result[key])
        if key == "checkpoint_dir" and ckpt_dir is None:
            value_text = f"- (run has no {TAG_CHECKPOINT_DIR} tag)"
        print(f"  {key:<18} {value_text}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `mmt runs`; returns the exit code (0 ok, 2 bad input: usage, unknown runs or metrics, an
    unreadable store), with one line on stderr naming the culprit."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    handlers = {"list": _cmd_list, "compare": _cmd_compare, "best": _cmd_best}
    try:
        return handlers[args.command](args)
    except RunsError as e:
        print(f"mmt runs {args.command}: error: {e}", file=sys.stderr)
        return 2
    except MlflowException as e:
        uri = resolve_tracking_uri(args.tracking_uri)
        print(f"mmt runs {args.command}: {describe_tracking_error(e.message, uri)}", file=sys.stderr)
        return 2
    except SQLAlchemyError as e:  # a file that is not an MLflow database
        uri = redact_url(resolve_tracking_uri(args.tracking_uri))
        print(
            f"mmt runs {args.command}: cannot read the MLflow store at {uri}: {getattr(e, 'orig', None) or e}",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
