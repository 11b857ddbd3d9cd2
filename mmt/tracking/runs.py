"""Reading runs back from MLflow for `mmt runs`: store resolution, run look-up, metric histories.

Everything goes through MLflow's public client API (`MlflowClient.search_runs`, `get_run`,
`get_metric_history`), so the same code reads a local sqlite store and an `mlflow server`. Searches are
paginated; metric histories are fetched concurrently because against a server each one is an HTTP round trip.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Experiment, Run, ViewType
from mlflow.exceptions import MlflowException

from mmt.secrets import tracking_credentials

# Tags written by `mmt train` (see the MLflow conventions in the README's training section).
TAG_RUN_DIR = "mmt.run_dir"
TAG_CHECKPOINT_DIR = "mmt.checkpoint_dir"
# Throughput metrics logged per step by `mmt train`.
SAMPLES_PER_S = "train/samples_per_s"
MFU = "train/mfu"

_PAGE_SIZE = 1000  # the largest page every MLflow backend accepts for search_runs / search_experiments
_FETCH_THREADS = 8  # concurrent history requests; bounded so a server is not flooded


class RunsError(Exception):
    """A user-facing error of `mmt runs` (unknown run / experiment, bad filter, missing store)."""


def open_client(uri: str) -> MlflowClient:
    """A client for `uri`; a sqlite store that does not exist is an error instead of a new empty database."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if str(path) != ":memory:" and not path.is_file():
            raise RunsError(
                f"no MLflow store at {path} (tracking URI {uri}); "
                "set MLFLOW_TRACKING_URI or pass --tracking-uri to point at the runs"
            )

    return MlflowClient(tracking_uri=tracking_credentials(uri))  # user-info -> MLFLOW_TRACKING_* variables


@dataclass(frozen=True)
class MetricPoint:
    """One logged value of a metric: its step, wall-clock time (ms since epoch) and value."""

    step: int
    timestamp_ms: int
    value: float


def _paginate(fetch) -> Iterable:
    """Yield every item of a paged MLflow search, following `page_token` until the last page."""
    token = None
    while True:
        page = fetch(token)
        yield from page
        token = page.token
        if not token:
            return


def experiments_by_id(client: MlflowClient) -> dict[str, Experiment]:
    """All active experiments, keyed by id."""
    pages = _paginate(lambda t: client.search_experiments(ViewType.ACTIVE_ONLY, _PAGE_SIZE, page_token=t))
    return {e.experiment_id: e for e in pages}


def find_experiment(client: MlflowClient, name: str) -> Experiment:
    """The active experiment called `name`, or a RunsError naming it and the experiments that exist."""
    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage != "active":
        known = sorted(e.name for e in experiments_by_id(client).values())
        state = "is deleted" if exp is not None else "not found"
        raise RunsError(
            f"experiment {name!r} {state} at {client.tracking_uri} (experiments: {', '.join(known) or 'none'})"
        )
    return exp


def search_runs(
    client: MlflowClient,
    experiment_ids: Sequence[str],
    filter_string: str = "",
    limit: int | None = None,
) -> list[Run]:
    """Active runs of the experiments, newest first, at most `limit` (None: all), across every result page."""
    runs: list[Run] = []
    token = None
    try:
        while limit is None or len(runs) < limit:
            page_size = _PAGE_SIZE if limit is None else min(_PAGE_SIZE, limit - len(runs))
            page = client.search_runs(
                list(experiment_ids),
                filter_string=filter_string,
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=page_size,
                order_by=["attributes.start_time DESC"],
                page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                break
    except MlflowException as e:
        if filter_string and e.error_code == "INVALID_PARAMETER_VALUE":
            raise RunsError(f"invalid --filter {filter_string!r}: {e.message}") from e
        raise
    return runs


def get_runs(client: MlflowClient, run_ids: Sequence[str]) -> list[Run]:
    """The runs with these ids, in the given order; an unknown id is a RunsError naming it."""
    runs = []
    for run_id in run_ids:
        try:
            runs.append(client.get_run(run_id))
        except MlflowException as e:
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                raise RunsError(f"run {run_id!r} not found at {client.tracking_uri}") from e
            raise
    return runs


def metric_histories(
    client: MlflowClient, runs: Sequence[Run], keys: Sequence[str]
) -> dict[str, dict[str, list[MetricPoint]]]:
    """`{run_id: {key: points sorted by (step, time)}}` for each run and each key that run logged.

    Keys a run never logged are skipped without a request (the run's latest metrics say which exist).
    """
    jobs = [(r.info.run_id, k) for r in runs for k in keys if k in r.data.metrics]

    def fetch(job: tuple[str, str]) -> list[MetricPoint]:
        points = [
            MetricPoint(int(m.step), int(m.timestamp), float(m.value))
            for m in client.get_metric_history(*job)
        ]
        return sorted(points, key=lambda p: (p.step, p.timestamp_ms))

    out: dict[str, dict[str, list[MetricPoint]]] = {r.info.run_id: {} for r in runs}
    if not jobs:
        return out
    with ThreadPoolExecutor(max_workers=min(_FETCH_THREADS, len(jobs))) as pool:
        for (run_id, key), points in zip(jobs, pool.map(fetch, jobs)):
            out[run_id][key] = points
    return out


def last_step(run: Run) -> int | None:
    """The largest step among the run's latest metric values (how far training got), None without metrics."""
    steps = [m.step for m in run.data.to_proto().metrics]
    return max(steps) if steps else None


def duration_s(run: Run, now_ms: int) -> float | None:
    """Seconds from start to end, or to `now_ms` for a run that has not ended."""
    start, end = run.info.start_time, run.info.end_time
    if start is None:
        return None
    return ((end or now_ms) - start) / 1000.0


def metric_mode(key: str) -> str:
    """'min' for losses and error rates, 'max' for the rest (accuracy, recall, throughput)."""
    name = key.rsplit("/", 1)[-1].lower()
    lower_is_better = ("loss", "perplexity", "ppl", "error", "err", "wer", "cer", "nll")
    return "min" if any(word in name for word in lower_is_better) else "max"


# The headline number of each `mmt train` task's evaluation (retrieval, VQA, captioning) and the shared loss.
HEADLINE_METRICS = (
    "train/loss",
    "val/loss",
    "val/recall_at_1",
    "val/vqa_accuracy",
    "val/bleu4",
    "val/perplexity",
)
# What `mmt train` logs for bookkeeping rather than as a result: throughput (compare shows its median in rows of
# its own), the schedule, memory, the evaluation's sample count and chance baselines.
BOOKKEEPING_METRICS = (
    "train/samples_per_s",
    "train/mfu",
    "train/tokens_per_s",
    "train/data_wait_frac",
    "train/lr",
    "train/epoch",
)
DEFAULT_METRIC_CAP = 8


def _bookkeeping(key: str) -> bool:
    return (
        key in BOOKKEEPING_METRICS
        or key.startswith("sys/")
        or key == "val/samples"
        or (key.startswith("val/") and key.endswith("_chance"))
    )


def logged_metrics(runs: Sequence[Run]) -> list[str]:
    """Every metric key the runs logged that is a result, not bookkeeping, in display order: mmt's headline
    metrics first (when the runs logged them), then ``val/*``, then the rest alphabetically."""
    logged = {k for r in runs for k in r.data.metrics if not _bookkeeping(k)}
    head = [k for k in HEADLINE_METRICS if k in logged]
    rest = sorted(logged - set(head), key=lambda k: (not k.startswith("val/"), k))
    return head + rest


def default_metrics(runs: Sequence[Run], cap: int = DEFAULT_METRIC_CAP) -> tuple[list[str], str | None]:
    """The metrics a table or plot shows when none are asked for: those the runs actually logged
    (`logged_metrics`: any MLflow run, whatever its metric names), at most ``cap``; with more, also a note
    saying how many were left out and how to pick them."""
    keys = logged_metrics(runs)
    if len(keys) <= cap:
        return keys, None
    left = keys[cap:]
    shown = ", ".join(left[:5]) + (", ..." if len(left) > 5 else "")
    return keys[:cap], (
        f"showing {cap} of the {len(keys)} metrics these runs logged (not shown: {shown}); "
        "choose with --metrics a,b,..."
    )
