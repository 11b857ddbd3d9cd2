"""`create_model`: build a `MultiModalModel` from a config object, a dict, or a YAML/JSON file."""

from __future__ import annotations

import os
from collections.abc import Sequence

from omegaconf import OmegaConf

from mmt.config.loader import load_config, read_config_file
from mmt.config.model import MultiModalConfig
from mmt.config.named import resolve_config
from mmt.config.root import Config
from mmt.model.multimodal import MultiModalModel


def load_model_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> MultiModalConfig:
    """A model file (its top level is the model section) or a full run config (it has a ``model:`` section)."""
    p = resolve_config(path, ("model", "run"))
    head = read_config_file(p)
    if isinstance(head, dict) and "model" in head and isinstance(head["model"], (dict, str)):
        return load_config(
            p, [f"model.{o}" if not o.startswith("model.") else o for o in overrides], Config
        ).model
    return load_config(p, overrides, MultiModalConfig)


def create_model(
    config: MultiModalConfig | Config | dict | str | os.PathLike, overrides: Sequence[str] = ()
) -> MultiModalModel:
    """Build the model.

    ``config``: a `MultiModalConfig`, a full `Config` (its ``model``), a plain dict of model fields, a shipped
    config's name (``"tiny_tri"``, ``"base_tri"``: `list_models()`) or a path to a YAML/JSON file (a model file
    or a run config). ``overrides`` are dotted ``key=value`` strings relative to the
    model section (``image.depth=4``, ``attention.kind=linear``).
    """
    if isinstance(config, Config):
        config = config.model
    if isinstance(config, dict):
        node = OmegaConf.merge(OmegaConf.structured(MultiModalConfig), config)
        config = OmegaConf.to_object(node)
    if isinstance(config, (str, os.PathLike)):
        config = load_model_config(config, overrides)
    elif overrides:
        base = OmegaConf.structured(config)
        config = OmegaConf.to_object(OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides))))
    if not isinstance(config, MultiModalConfig):
        raise TypeError(
            f"create_model takes a MultiModalConfig, Config, dict or path, got {type(config).__name__}"
        )
    return MultiModalModel(config)
