"""Pure functions of `mmt runs`: EMA smoothing, best-direction rule, differing params, size parsing, URIs."""

from __future__ import annotations

import pytest
from mlflow.entities import Metric, Param, Run, RunData, RunInfo

from mmt.tracking.runs import (
    MetricPoint,
    RunsError,
    default_metrics,
    metric_mode,
)
from mmt.tracking.runs_compare import MetricStats, differing_params
from mmt.tracking.runs_plot import default_size, ema, parse_size
from mmt.tracking.uri import default_tracking_uri, resolve_tracking_uri


def _run(params: dict[str, str]) -> Run:
    info = RunInfo("r", "0", "user", "FINISHED", 0, 1, "active")
    return Run(info, RunData(params=[Param(k, v) for k, v in params.items()]))


def test_ema_matches_debiased_formula():
    values = [1.0, 3.0, 2.0, 5.0]
    w = 0.5
    # debiased EMA written out by hand: s_t = w s_{t-1} + (1 - w) x_t, divided by (1 - w^t)
    s1 = 0.5 * 1.0
    s2 = 0.5 * s1 + 0.5 * 3.0
    s3 = 0.5 * s2 + 0.5 * 2.0
    s4 = 0.5 * s3 + 0.5 * 5.0
    expected = [s1 / 0.5, s2 / 0.75, s3 / 0.875, s4 / 0.9375]
    assert ema(values, w) == pytest.approx(expected)
    assert ema(values, 0.0) == values
    assert ema([4.0, 4.0, 4.0], 0.9) == pytest.approx([4.0, 4.0, 4.0])  # a constant stays constant
    with pytest.raises(RunsError, match="smooth"):
        ema(values, 1.0)


def test_metric_mode_minimises_losses_and_errors():
    assert metric_mode("train/loss") == "min"
    assert metric_mode("val/caption_loss") == "min"
    assert metric_mode("val/wer") == "min"
    assert metric_mode("val/recall_at_1") == "max"
    assert metric_mode("train/samples_per_s") == "max"


def test_differing_params_counts_missing_keys():
    runs = [
        _run({"model.attention.kind": "softmax", "train.seed": "0", "only.a": "1"}),
        _run({"model.attention.kind": "linear", "train.seed": "0"}),
    ]
    assert differing_params(runs) == ["model.attention.kind", "only.a"]


def test_metric_stats_final_and_best():
    pts = [MetricPoint(0, 10, 2.0), MetricPoint(1, 20, 0.5), MetricPoint(2, 30, 1.0)]
    s = MetricStats.from_points(pts, "min")
    assert (s.final, s.final_step, s.best, s.best_step) == (1.0, 2, 0.5, 1)
    s = MetricStats.from_points(pts, "max")
    assert (s.best, s.best_step) == (2.0, 0)
    assert MetricStats.from_points([], "max").final is None
    nan = MetricPoint(3, 40, float("nan"))  # a diverged last step: final says so, best ignores it
    s = MetricStats.from_points([*pts, nan], "min")
    assert s.final != s.final and (s.best, s.best_step) == (0.5, 1)


def test_default_metrics_are_what_the_runs_logged_headline_first():
    def run_with(*keys: str) -> Run:
        info = RunInfo("r", "0", "user", "FINISHED", 0, 1, "active")
        return Run(info, RunData(metrics=[Metric(k, 1.0, 0, 0) for k in keys]))

    retrieval = run_with(
        "train/loss", "train/lr", "val/recall_at_1", "val/text_to_image_recall_at_5", "val/loss", "sys/rss_gb"
    )
    vqa = run_with("train/loss", "val/vqa_accuracy", "train/samples_per_s", "train/grad_norm")
    assert default_metrics([retrieval, vqa]) == (
        [
            "train/loss",
            "val/loss",
            "val/recall_at_1",
            "val/vqa_accuracy",
            "val/text_to_image_recall_at_5",
            "train/grad_norm",
        ],
        None,
    )
    other = run_with("train/loss", "val/samples", "val/top5", "val/a_b_recall_at_1_chance", "val/acc")
    assert default_metrics([other]) == (["train/loss", "val/acc", "val/top5"], None)
    # a run that knows nothing of mmt's names: its own metrics, and a note when there are more than the cap
    plain = run_with("loss", "acc", "lr")
    assert default_metrics([plain]) == (["acc", "loss", "lr"], None)
    keys, note = default_metrics([plain], cap=2)
    assert keys == ["acc", "loss"] and "showing 2 of the 3 metrics" in note and "lr" in note


def test_plot_size_parsing():
    assert parse_size("640x480") == (640, 480)
    assert default_size(3) == (1000, 960)
    for bad in ("640", "axb", "10x10"):
        with pytest.raises(RunsError, match="plot-size"):
            parse_size(bad)


def test_tracking_uri_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db" == default_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri() == "http://127.0.0.1:1"
    assert resolve_tracking_uri("sqlite:////x.db") == "sqlite:////x.db"
