"""The DeepSpeed JSON, generated from the typed `train.*` config; a user's own JSON is merged on top.

The generated dict is the single source of truth for batch sizes, precision, ZeRO and the optimiser. A user file
(``train.ds_config``) may add settings mmt does not model (communication tuning, aio, ...). A key set in both to
different values is a conflict: the run stops with a `ConfigError` listing every conflict, unless
``train.ds_config_override=true`` (then the user's value wins and the conflicts are printed and logged).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmt.config import ConfigError
from mmt.config.train import TrainConfig
from mmt.training.batching import BatchPlan


def build_ds_config(train: TrainConfig, plan: BatchPlan, device: torch.device) -> dict[str, Any]:
    """DeepSpeed config for ``train`` on ``device`` with the resolved batch ``plan``."""
    opt = train.optimizer
    adamw_params: dict[str, Any] = {
        "lr": opt.lr,
        "betas": [opt.beta1, opt.beta2],
        "eps": opt.eps,
        "weight_decay": opt.weight_decay,
    }
    cpu = device.type == "cpu"
    if cpu or (opt.torch_adam and not train.offload_optimizer):
        # DeepSpeed's fused / cpu_adam ops are JIT-compiled (1-2 min per fresh machine) and bring nothing on CPU.
        adamw_params["torch_adam"] = True
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not cpu}
    if train.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": not cpu}
    cfg: dict[str, Any] = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "optimizer": {"type": "AdamW", "params": adamw_params},
        "zero_optimization": zero,
        "gradient_clipping": train.grad_clip,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if cpu:
        cfg["zero_force_ds_cpu_optimizer"] = False
    if train.precision == "fp16":
        cfg["fp16"].update(
            {
                "loss_scale": train.loss_scale,
                "initial_scale_power": train.initial_scale_power,
                "loss_scale_window": 1000,
                "hysteresis": 2,
                "min_loss_scale": 1,
            }
        )
    return cfg


def load_user_ds_config(path: str, source: str = "train.ds_config") -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(source, "train.ds_config", f"no such DeepSpeed config file: {p}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(str(p), "<file>", f"not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(p), "<root>", "expected a JSON object")
    return data


def merge_ds_config(
    generated: dict[str, Any],
    user: dict[str, Any],
    *,
    user_wins: bool = False,
    source: str = "train.ds_config",
) -> tuple[dict[str, Any], list[str]]:
    """Deep-merge ``user`` into ``generated``; return (merged, conflicts as 'key: mmt=X, user=Y').

    A conflict is a key set in both to different non-dict values (``"auto"`` in the user file defers to mmt).
    Raises `ConfigError` listing all conflicts unless ``user_wins``.
    """
    conflicts: list[str] = []

    def merge(a: dict[str, Any], b: dict[str, Any], prefix: str) -> dict[str, Any]:
        out = dict(a)
        for k, v in b.items():
            key = f"{prefix}{k}"
            if k in out and isinstance(out[k], dict) and isinstance(v, dict):
                out[k] = merge(out[k], v, key + ".")
            elif k in out and v == "auto":
                continue
            elif k in out and not _same(out[k], v):
                conflicts.append(f"{key}: mmt={json.dumps(out[k])}, user={json.dumps(v)}")
                if user_wins:
                    out[k] = v
            else:
                out[k] = v
        return out

    merged = merge(generated, user, "")
    if conflicts and not user_wins:
        raise ConfigError(
            source,
            "train.ds_config",
            "conflicts with the config generated from train.* (change the train.* key, drop it from "
            "the JSON, or set train.ds_config_override=true):\n  " + "\n  ".join(conflicts),
        )
    return merged, conflicts


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def batch_plan_from_ds(ds: dict[str, Any], plan: BatchPlan) -> BatchPlan:
    """The batch plan after a user override of the DeepSpeed batch keys (kept consistent with the loader)."""
    g = int(ds.get("train_batch_size", plan.global_batch))
    m = int(ds.get("train_micro_batch_size_per_gpu", plan.micro_batch))
    a = int(ds.get("gradient_accumulation_steps", plan.grad_accum))
    if g != m * a * plan.world_size:
        raise ConfigError(
            "train.ds_config",
            "train_batch_size",
            f"{g} != train_micro_batch_size_per_gpu {m} * gradient_accumulation_steps {a} * "
            f"world size {plan.world_size}",
        )
    return BatchPlan(g, m, a, plan.world_size)
