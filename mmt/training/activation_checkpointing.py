"""Activation checkpointing applied from the training side: the model itself never knows about it.

Each `mmt.model.block.TransformerBlock` forward is wrapped with non-reentrant `torch.utils.checkpoint`, so its
activations are recomputed in backward instead of stored. Calls with a KV cache (generation) and calls under
``torch.no_grad`` run the plain forward.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmt.model.block import TransformerBlock


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wrap every TransformerBlock's forward in place; returns how many blocks were wrapped."""
    n = 0
    for module in model.modules():
        if isinstance(module, TransformerBlock) and not getattr(module, "_mmt_checkpointed", False):
            original = module.forward

            @functools.wraps(original)
            def wrapped(*args, __orig=original, **kwargs):
                if kwargs.get("cache") is not None or not torch.is_grad_enabled():
                    return __orig(*args, **kwargs)
                return checkpoint(__orig, *args, use_reentrant=False, **kwargs)

            module.forward = wrapped
            module._mmt_checkpointed = True
            n += 1
    return n
