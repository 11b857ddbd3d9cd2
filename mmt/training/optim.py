"""AdamW parameter groups and the warmup + cosine learning-rate schedule.

Weight decay is meant to shrink weight matrices; applied to norm gains, biases, embedding tables, positional
tables or the temperature it only fights the model, so those go into a group with ``weight_decay = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from mmt.config.train import ScheduleConfig

_NO_DECAY_NAME_PARTS = ("pos_embed", "pos_emb", "positional", "cls_token", "logit_scale", "bias")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)) or (
        "norm" in type(module).__name__.lower()
    )


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters that must not decay: norms, biases, embeddings, positional tables, scalars."""
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        embedding_or_norm = isinstance(module, nn.Embedding) or _is_norm(module)
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if embedding_or_norm or p.ndim < 2 or any(part in full for part in _NO_DECAY_NAME_PARTS):
                names.add(full)
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups (decay / no decay) over the trainable parameters, in a fixed order."""
    skip = no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name in skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def lr_lambda(sched: ScheduleConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step ``s`` (0-based, as LambdaLR counts)."""
    warmup = sched.warmup_steps
    total = max(1, total_steps)

    def f(step: int) -> float:
        if warmup and step < warmup:
            return sched.warmup_init_ratio + (1.0 - sched.warmup_init_ratio) * step / warmup
        if sched.kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return sched.min_lr_ratio + (1.0 - sched.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def make_scheduler_factory(sched: ScheduleConfig, total_steps: int):
    """A callable DeepSpeed invokes with its optimizer to build the scheduler (saved in the engine checkpoint)."""
    fn = lr_lambda(sched, total_steps)

    def factory(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)

    return factory
