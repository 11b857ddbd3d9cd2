"""Work-arounds for DeepSpeed behaviour that breaks on valid models, applied once, narrowly.

0-dim parameters: the engine syncs initial weights with ``dist.broadcast(p.data.view(torch.uint8))``, which
raises "self.dim() cannot be 0 to view Float as Byte" for a scalar parameter such as the CLIP temperature
(``logit_scale``). The wrapper below gives scalars a 1-element shape (a view of the same storage) for the
duration of that broadcast only, then restores it; nothing else in the engine sees the change.
"""

from __future__ import annotations

import functools

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
    _PATCHED = True
