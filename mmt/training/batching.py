"""Batch arithmetic: global_batch = micro_batch * grad_accum * world_size, any two settings fixing the third."""

from __future__ import annotations

from dataclasses import dataclass

from mmt.config import ConfigError
from mmt.config.train import TrainConfig


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    micro_batch: int
    grad_accum: int
    world_size: int

    @property
    def per_rank(self) -> int:
        """Samples one rank consumes per optimizer step."""
        return self.micro_batch * self.grad_accum


def resolve_batch(train: TrainConfig, world_size: int, source: str = "config") -> BatchPlan:
    """Fill in the missing one of (global_batch, micro_batch, grad_accum) for ``world_size`` ranks.

    Raises `ConfigError` naming the keys and the world size when the three cannot agree, e.g. a global batch of
    30 on 4 ranks.
    """
    g, m, a, w = train.global_batch, train.micro_batch, train.grad_accum, world_size
    where = f"{source} (world size {w})"

    def fail(key: str, msg: str) -> ConfigError:
        return ConfigError(where, f"train.{key}", msg)

    def divide(by: int, name: str) -> int:
        """``g / (by * w)``, or the error naming ``name`` (the given one of micro_batch / grad_accum)."""
        if g % (by * w):
            raise fail("global_batch", f"global_batch={g} is not divisible by {name}={by} * world_size={w}")
        return g // (by * w)

    if g and m and a:
        if g != m * a * w:
            raise fail(
                "global_batch",
                f"global_batch={g} != micro_batch={m} * grad_accum={a} * world_size={w} "
                f"(= {m * a * w}); set one of them to 0 to derive it",
            )
    elif g and m:
        a = divide(m, "micro_batch")
    elif g:
        a = a or 1
        m = divide(a, "grad_accum")
    elif m:
        a = a or 1
        g = m * a * w
    else:
        raise fail("global_batch", "set train.global_batch or train.micro_batch")
    if m < 1 or a < 1:
        raise fail("global_batch", f"global_batch={g} is too small for world_size={w}")
    return BatchPlan(g, m, a, w)
