"""Settings of a built DeepSpeed engine that its JSON config cannot express.

One process, ZeRO-0: the engine still all-reduces every gradient after backward (`buffered_allreduce_fallback`:
flatten all gradients into buckets, all-reduce over a group of one, copy them back). With one rank that is an
identity that costs two full copies of the gradients: 550 ms of a 3.1 s CPU step for base_tri (124M params),
the whole of ZeRO-0's overhead over a plain PyTorch loop there. The engine's own switch
``enable_backward_allreduce`` (the pipeline engine turns it off the same way) skips it. ZeRO-1/2/3 move gradients
into their partitions in the same pass, so they keep it.
"""

from __future__ import annotations

from typing import Any


def skip_single_rank_allreduce(engine: Any) -> bool:
    """Turn off the gradient all-reduce of a ZeRO-0 engine on a data-parallel group of one; True if it did."""
    if engine.zero_optimization_stage() != 0 or engine.dp_world_size != 1:
        return False
    engine.enable_backward_allreduce = False
    return True
