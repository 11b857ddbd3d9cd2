"""The one rule for which MLflow store mmt talks to, shared by `mmt train`, `mmt eval --mlflow` and `mmt runs`."""

from __future__ import annotations

import os
from pathlib import Path


def default_tracking_uri(cwd: str | os.PathLike | None = None) -> str:
    """The embedded store used when nothing is configured: ``sqlite:///<cwd>/mlflow.db``."""
    return f"sqlite:///{Path(cwd or os.getcwd()).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(configured: str | None = None) -> str:
    """``configured`` (``tracking.uri`` or ``--tracking-uri``), else ``$MLFLOW_TRACKING_URI``, else
    `default_tracking_uri`: so `mmt runs` without flags reads the store `mmt train` wrote to."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
