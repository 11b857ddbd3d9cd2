"""Typed configuration of experiment tracking: the `tracking.*` section."""

from __future__ import annotations

from dataclasses import dataclass

from mmt.config.fields import cfg_field


@dataclass
class TrackingConfig:
    experiment: str = cfg_field("mmt", doc="MLflow experiment name")
    run_name: str = cfg_field("run", doc="MLflow run name (also names the run directory by default)")
