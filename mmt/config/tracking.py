"""Typed configuration of experiment tracking: the `tracking.*` section."""

from __future__ import annotations

from dataclasses import dataclass

from mmt.config.fields import cfg_field
from mmt.secrets import DEFAULT_SECRET_KEYS


@dataclass
class TrackingConfig:
    experiment: str = cfg_field("mmt", doc="MLflow experiment name")
    run_name: str = cfg_field("run", doc="MLflow run name (also names the run directory by default)")
    backend: str = cfg_field(
        "mlflow", doc="where metrics go besides the console: mlflow or none", choices=("mlflow", "none")
    )
    uri: str = cfg_field(
        "", doc="MLflow tracking URI ('': $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)"
    )
    artifact_location: str = cfg_field(
        "",
        doc="artifact root of a newly created experiment ('': <db dir>/mlruns "
        "for a sqlite store, the server's default otherwise)",
    )
    flush_interval_s: float = cfg_field(
        5.0, doc="the background thread sends queued metrics at least this often", gt=0
    )
    log_system_metrics: bool = cfg_field(
        True, doc="log process memory (and GPU memory) with the step metrics"
    )
    tags: list[str] = cfg_field(
        default_factory=list, doc="extra run tags as key=value strings (a comma-separated string is accepted)"
    )
    redact_keys: list[str] = cfg_field(
        default_factory=lambda: list(DEFAULT_SECRET_KEYS),
        doc="glob patterns (case-insensitive) of key names whose values are secrets: shown as *** in MLflow, "
        "saved configs, the console and metrics.jsonl (URL user-info always is); a comma-separated string is "
        "accepted",
    )
