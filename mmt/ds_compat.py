"""Work-arounds for DeepSpeed behaviour that breaks on valid models, applied once, narrowly.

0-dim parameters: the engine syncs initial weights with ``dist.broadcast(p.data.view(torch.uint8))``, which
raises "self.dim() cannot be 0 to view Float as Byte" for a scalar parameter such as the CLIP temperature
(``logit_scale``). The wrapper below gives scalars a 1-element shape (a view of the same storage) for the
duration of that broadcast only, then restores it; nothing else in the engine sees the change.

The same scalar breaks ZeRO-0 fp32 gradient clipping (``p.grad.data.mul_(clip_coef)`` with a ``[1]``-shaped
coefficient on a ``[]``-shaped gradient). The clip function the engine calls is wrapped to hand such gradients
over as 1-element views of the same storage, so clipping scales them in place like every other gradient.
ZeRO-3 partitions each parameter after the same kind of uint8 broadcast; scalars take the 1-element view there
too.
"""

from __future__ import annotations

import functools

import torch

_PATCHED = False


def patch_deepspeed() -> None:
    global _PATCHED
    if _PATCHED:
        return
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._broadcast_model

    @functools.wraps(original)
    def broadcast_model(self):  # type: ignore[no-untyped-def]
        scalars = [p for p in self.module.parameters() if p.dim() == 0]
        for p in scalars:
            p.data = p.data.reshape(1)
        try:
            return original(self)
        finally:
            for p in scalars:
                p.data = p.data.reshape(())

    DeepSpeedEngine._broadcast_model = broadcast_model

    import deepspeed.runtime.engine as engine_mod

    original_clip = engine_mod.clip_grad_norm_

    @functools.wraps(original_clip)
    def clip_grad_norm_(parameters, *args, **kwargs):  # type: ignore[no-untyped-def]
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        if any(p.grad is not None and p.grad.dim() == 0 for p in params):
            params = [_GradView(p) if p.grad is not None and p.grad.dim() == 0 else p for p in params]
        return original_clip(params, *args, **kwargs)

    engine_mod.clip_grad_norm_ = clip_grad_norm_

    from deepspeed.runtime.zero.partition_parameters import Init

    original_init_param = Init._zero_init_param

    @functools.wraps(original_init_param)
    def zero_init_param(self, param):  # type: ignore[no-untyped-def]
        if param.dim() != 0:
            return original_init_param(self, param)
        # DeepSpeed's own steps for one parameter, with the broadcast on a 1-element view of the scalar.
        import deepspeed.comm as dist

        self._convert_to_deepspeed_param(param)
        group = self.get_partition_dp_group(param)
        src = 0 if dist.get_world_group() == group else dist.get_global_rank(group, 0)
        dist.broadcast(param.data.reshape(1).view(torch.uint8), src, group)
        param.partition()

    Init._zero_init_param = zero_init_param
    _PATCHED = True


class _GradView:
    """Stands in for a scalar parameter: ``.grad`` is a 1-element view, so in-place updates reach the real one."""

    def __init__(self, p: torch.Tensor) -> None:
        self.grad = p.grad.view(1)
        self.device = p.device
