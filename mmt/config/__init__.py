"""The typed config tree (nested dataclasses) and its YAML/JSON + dotted-override loader."""

from mmt.config.data import DataConfig
from mmt.config.errors import ConfigError
from mmt.config.loader import dump_yaml, flatten, load_config, save_config, to_dict
from mmt.config.model import (
    AttentionConfig,
    AudioEncoderConfig,
    DecoderConfig,
    EncoderConfig,
    FusionConfig,
    HeadsConfig,
    ImageEncoderConfig,
    ModelConfig,
    MultiModalConfig,
    TextEncoderConfig,
)
from mmt.config.root import Config
from mmt.config.tracking import TrackingConfig
from mmt.config.train import TrainConfig

__all__ = [
    "AttentionConfig",
    "AudioEncoderConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DecoderConfig",
    "EncoderConfig",
    "FusionConfig",
    "HeadsConfig",
    "ImageEncoderConfig",
    "ModelConfig",
    "MultiModalConfig",
    "TextEncoderConfig",
    "TrackingConfig",
    "TrainConfig",
    "dump_yaml",
    "flatten",
    "load_config",
    "save_config",
    "to_dict",
]
