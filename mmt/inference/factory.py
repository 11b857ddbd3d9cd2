"""``create_model``, ``create_model_and_transforms`` and ``get_tokenizer``: a model with its preprocessing, open_clip
style.

Weights come from an ``mmt ckpt convert`` export (safetensors + ``config.yaml``) or straight from a training run
(its folder, ``checkpoints/`` or one ``step_*`` tag: DeepSpeed ZeRO 0-3 shards read by `mmt.ckpt.ZeroCheckpoint`,
no engine). The preprocessing uses the data settings of the run that trained them (image mean / std, text length,
audio rate), recorded in the checkpoint, so inference sees inputs exactly as training did.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf

from mmt.ckpt.layout import CheckpointError
from mmt.ckpt.pretrained import load_pretrained
from mmt.ckpt.reader import ZeroCheckpoint
from mmt.config.data import DataConfig
from mmt.config.model import MultiModalConfig
from mmt.config.root import Config
from mmt.inference.preprocess import Preprocess
from mmt.model import factory
from mmt.model.multimodal import MultiModalModel

EXPORT_META = "mmt_export.json"


def _is_export(p: Path) -> bool:
    return (
        p.is_file()
        and p.suffix == ".safetensors"
        or (
            p.is_dir()
            and any((p / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json"))
        )
    )


def _structured(schema: type, data: dict[str, Any] | None) -> Any:
    node = OmegaConf.merge(OmegaConf.structured(schema), data or {})
    return OmegaConf.to_object(node)


def read_source(pretrained: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any] | None, Any]:
    """(model config dict, run config dict or None, weights reader) of an export or a training checkpoint."""
    p = Path(pretrained)
    if not p.exists():
        raise CheckpointError(f"{p}: no such export or checkpoint")
    if _is_export(p):
        folder = p if p.is_dir() else p.parent
        meta_file = folder / EXPORT_META
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        cfg_file = folder / "config.yaml"
        model_cfg = yaml.safe_load(cfg_file.read_text()) if cfg_file.is_file() else None
        return model_cfg, meta.get("train_config"), ("export", p)
    ck = ZeroCheckpoint(p)
    run = ck.config or {}
    return run.get("model"), run or None, ("zero", ck)


def load_weights(model: MultiModalModel, reader: Any, source: str) -> None:
    """Strict load; a mismatch is one `CheckpointError` line naming the file and what differs."""
    kind, obj = reader
    if kind == "export":
        load_pretrained(model, obj)
        return
    state = model.state_dict()
    names = list(obj.shapes())
    missing = [k for k in state if k not in obj.shapes()]
    unexpected = [k for k in names if k not in state]
    shapes = [
        f"{k}: {tuple(obj.shapes()[k])} in the checkpoint, {tuple(state[k].shape)} in the model"
        for k in names
        if k in state and tuple(obj.shapes()[k]) != tuple(state[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"shape differs for {len(shapes)} ({'; '.join(shapes[:3])})")
        if missing:
            parts.append(f"{len(missing)} model tensor(s) not in the checkpoint ({', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} tensor(s) the model does not have ({', '.join(unexpected[:3])})")
        raise CheckpointError(f"{obj.dir}: does not fit the model config {source}: " + "; ".join(parts))
    with torch.no_grad():
        for k, t in obj.iter_tensors():
            state[k].copy_(t.to(state[k].dtype))


def create_model(
    config: MultiModalConfig | Config | dict | str | os.PathLike, overrides: Sequence[str] = ()
) -> MultiModalModel:
    """`mmt.model.factory.create_model` (fresh weights) with the preprocessing for raw inputs attached (default data
    settings), so ``model(text_inputs="a photo", image_features="x.jpg")`` works: the public ``mmt.create_model``."""
    model = factory.create_model(config, overrides)
    model.preprocess = Preprocess(model.cfg)
    return model


def create_model_and_transforms(
    name_or_path: str | os.PathLike | None = None,
    pretrained: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    overrides: list[str] | None = None,
) -> tuple[MultiModalModel, Preprocess]:
    """``(model in eval mode, preprocess)``.

    ``name_or_path``: a shipped model name (``mmt.list_models()``), a model / run config file, or ``None`` to
    take the config recorded with ``pretrained``. ``pretrained``: an ``mmt ckpt convert`` folder (or its
    ``.safetensors`` file) or a training run / checkpoint folder. Passing only an export or run folder as
    ``name_or_path`` means both. A config that does not fit the weights raises `CheckpointError`.
    """
    if pretrained is None and name_or_path is not None and Path(name_or_path).is_dir():
        pretrained, name_or_path = name_or_path, None
    model_dict: dict[str, Any] | None = None
    run: dict[str, Any] | None = None
    reader = None
    if pretrained is not None:
        model_dict, run, reader = read_source(pretrained)
    if name_or_path is not None:
        model = factory.create_model(name_or_path, overrides or [])
        source = str(name_or_path)
    elif model_dict is not None:
        model = factory.create_model(_structured(MultiModalConfig, model_dict), overrides or [])
        source = f"recorded with {pretrained}"
    else:
        raise ValueError(f"{pretrained}: no model config recorded there; pass a model name or config file")
    if reader is not None:
        load_weights(model, reader, source)
    data_cfg = _structured(DataConfig, (run or {}).get("data"))
    model.preprocess = Preprocess(model.cfg, data_cfg)
    return model.to(device).eval(), model.preprocess


def get_tokenizer(name_or_path: str | os.PathLike) -> Any:
    """The text side of `Preprocess` for a model name, config or export: ``tok(texts)`` -> forward kwargs
    ``{"text_inputs": (B, L) ids, "text_attention_mask": (B, L)}`` (byte-level or the config's tokenizer file)."""
    if Path(name_or_path).exists() and (Path(name_or_path).is_dir()):
        model_dict, run, _ = read_source(name_or_path)
        cfg = _structured(MultiModalConfig, model_dict)
        data = _structured(DataConfig, (run or {}).get("data"))
    else:
        cfg, data = factory.load_model_config(name_or_path), DataConfig()
    return Preprocess(cfg, data).text
