"""Typed configuration of the data pipeline: the `data.*` section."""

from __future__ import annotations

from dataclasses import dataclass

from mmt.config.fields import cfg_field


@dataclass
class DataConfig:
    train_urls: str = cfg_field("", doc="training shards: brace-expanded local paths or fsspec URLs (s3://...)")
    val_urls: str = cfg_field("", doc="held-out shards for evaluation")
    num_workers: int = cfg_field(2, doc="DataLoader workers per rank", ge=0)
