"""The root of the config tree: one typed object, the single source of truth for a run."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmt.config.data import DataConfig
from mmt.config.model import MultiModalConfig
from mmt.config.slurm import SlurmConfig
from mmt.config.tracking import TrackingConfig
from mmt.config.train import TrainConfig


@dataclass
class Config:
    model: MultiModalConfig = field(default_factory=MultiModalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
