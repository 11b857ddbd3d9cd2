"""The one boundary between mmt and DeepSpeed's engine: its JSON config and ``deepspeed.initialize``.

Every engine in mmt (training, `mmt eval`, the tests' checkpoint harness, the benchmarks) is made by `initialize`
here, which applies `mmt.ds_compat`'s work-arounds first, so no caller has to remember them.

The DeepSpeed JSON is generated from the typed `train.*` config (`build_ds_config`); it is the single source of
truth for batch sizes, precision, ZeRO and the optimiser. A user file (``train.ds_config``) may add settings mmt
does not model (communication tuning, aio, ...). A key set in both to different values is a conflict: the run stops
with a `ConfigError` listing every conflict, unless ``train.ds_config_override=true`` (then the user's value wins
and the conflicts are printed and logged). `resolve_ds_config` does all of that for a training run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmt.config import ConfigError
from mmt.config.train import TrainConfig
from mmt.ds_compat import patch_deepspeed, release_zero3_module, reuse_cpu_grad_buffers
from mmt.training.batching import BatchPlan
from mmt.training.engine_tuning import skip_single_rank_allreduce
from mmt.training.optim import make_scheduler_factory, param_groups


@dataclass(frozen=True)
class ResolvedDsConfig:
    """A training run's DeepSpeed config, the batch plan it implies, and the user-file conflicts it overrode."""

    config: dict[str, Any]
    plan: BatchPlan
    conflicts: list[str]


def resolve_ds_config(
    train: TrainConfig, plan: BatchPlan, device: torch.device, source: str = "config"
) -> ResolvedDsConfig:
    """The generated config for ``train``, the user's ``train.ds_config`` merged over it, checked for ``device``.

    Raises `ConfigError` for conflicts (unless ``train.ds_config_override``), an inconsistent batch override, or
    fp16 on CPU (DeepSpeed's CPU accelerator has no fp16 training)."""
    ds = build_ds_config(train, plan, device)
    conflicts: list[str] = []
    if train.ds_config:
        ds, conflicts = merge_ds_config(
            ds, load_user_ds_config(train.ds_config), user_wins=train.ds_config_override
        )
        plan = batch_plan_from_ds(ds, plan)
    if train.precision == "fp16" and device.type == "cpu":
        raise ConfigError(
            source,
            "train.precision",
            "fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16 training); use bf16 or fp32 on CPU",
        )
    return ResolvedDsConfig(ds, plan, conflicts)


def eval_ds_config(precision: str, micro_batch: int, world_size: int) -> dict[str, Any]:
    """A plain (ZeRO-0, no optimiser) engine for evaluation: any checkpoint's full weights fit it on any world
    size."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world_size,
        "zero_optimization": {"stage": 0},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,
    }


def initialize(
    model: nn.Module,
    ds_config: dict[str, Any],
    *,
    model_parameters: Iterable[Any] | None = None,
    lr_scheduler: Callable[[Any], Any] | None = None,
) -> Any:
    """``deepspeed.initialize`` with mmt's DeepSpeed work-arounds applied first; returns the engine only.

    The one call of ``deepspeed.initialize`` in mmt: an upgrade of DeepSpeed is checked here and in
    `mmt.ds_compat`."""
    import deepspeed

    patch_deepspeed()
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model_parameters, config=ds_config, lr_scheduler=lr_scheduler
    )
    reuse_cpu_grad_buffers(engine.optimizer)
    return engine


def destroy(engine: Any) -> None:
    """Release an engine so the teardown can free the process groups: DeepSpeed's ``engine.destroy()`` removes the
    hooks that keep its ZeRO optimizer alive, and `release_zero3_module` the references ZeRO-3 keeps to the model
    (whose parameters hold the data-parallel group). The one release of an engine in mmt, as `initialize` is the
    one creation."""
    module = engine.module
    try:
        engine.destroy()
    finally:
        release_zero3_module(module)


def initialize_for_training(
    model: nn.Module, train: TrainConfig, ds_config: dict[str, Any], total_steps: int | None = None
) -> Any:
    """The engine of a training run: AdamW's two parameter groups (no decay on norms, biases, embeddings) and,
    with ``total_steps``, mmt's warmup + cosine schedule (None: DeepSpeed keeps the lr constant)."""
    scheduler = make_scheduler_factory(train.schedule, total_steps) if total_steps is not None else None
    engine = initialize(
        model,
        ds_config,
        model_parameters=param_groups(model, train.optimizer.weight_decay),
        lr_scheduler=scheduler,
    )
    skip_single_rank_allreduce(engine)
    return engine


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
        # torch's fused AdamW: one multi-threaded kernel per tensor, no temporaries. Its single-tensor default
        # allocates ~6 whole-size temporaries per step; on ZeRO-1/2's one flat partition (500 MB for 124M
        # params) that was 1.7 s of a 5 s CPU step (page faults of fresh allocations), fused 0.17 s.
        adamw_params["fused"] = True
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
