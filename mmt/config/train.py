"""Typed configuration of training: the `train.*` section."""

from __future__ import annotations

from dataclasses import dataclass

from mmt.config.fields import cfg_field


@dataclass
class TrainConfig:
    task: str = cfg_field("retrieval", doc="training task", choices=("retrieval", "vqa", "captioning"))
    seed: int = cfg_field(0, doc="global seed")
    run_dir: str = cfg_field("runs/${tracking.run_name}", doc="where checkpoints, logs and the resolved config go")
