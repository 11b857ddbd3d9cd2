"""One canary per `mmt.ds_compat` work-around: does the installed DeepSpeed still have the bug?

Run in a fresh process (``python -m tests.ds_canaries OUT.json``) so that nothing is patched: each canary calls the
upstream DeepSpeed function directly on tiny inputs (a 1-rank gloo group where it needs collectives) and records
whether the behaviour the work-around exists for is still there. `tests/test_ds_compat.py` reads the JSON.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

CANARIES: dict[str, Callable[[], tuple[bool, str]]] = {}


def canary(fn: Callable[[], tuple[bool, str]]) -> Callable[[], tuple[bool, str]]:
    CANARIES[fn.__name__] = fn
    return fn


def _scalar_module() -> nn.Module:
    m = nn.Module()
    m.logit_scale = nn.Parameter(torch.tensor(2.0))
    return m


def _raises(fn: Callable[[], object], needle: str) -> tuple[bool, str]:
    """(True, message) when ``fn`` raises with ``needle`` in its message: the bug is still there."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - any other outcome means the upstream behaviour changed
        return needle in str(e), f"{type(e).__name__}: {e}"
    return False, "no error"


@canary
def scalar_broadcast() -> tuple[bool, str]:
    from deepspeed.runtime.engine import DeepSpeedEngine

    fake = SimpleNamespace(dist_backend="gloo", module=_scalar_module())
    return _raises(lambda: DeepSpeedEngine._broadcast_model(fake), "cannot be 0")


@canary
def scalar_universal_merge() -> tuple[bool, str]:
    from deepspeed.checkpoint.ds_to_universal import _merge_zero_shards

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "0").mkdir()
        torch.save(torch.tensor([1.5]), Path(tmp) / "0" / "exp_avg.00")  # a scalar's one-element fragment
        slices = _merge_zero_shards(tmp, "exp_avg", 1, [torch.Size([])])
    # the caller concatenates the slices along dim 0, impossible for 0-dim ones
    return _raises(lambda: torch.cat(slices, dim=0), "zero-dimensional tensor")


@canary
def zero3_universal_param_groups() -> tuple[bool, str]:
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    pa, pb = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    flat_a, flat_b = torch.zeros(2), torch.zeros(3)
    fake = SimpleNamespace(
        _load_global_state_stage3=lambda sd: None,
        fp16_groups=[[pa], [pb]],
        fp32_partitioned_groups_flat=[flat_a, flat_b],
        param_names={pa: "a", pb: "b"},
        load_hp_checkpoint_state=lambda path, key, param: torch.ones(param.numel()),
        optimizer=SimpleNamespace(state={flat_a: {}, flat_b: {}}, param_groups=[{}, {}]),
        swap_optimizer=False,
        fp16_partitioned_groups_flat=[torch.zeros(2), torch.zeros(3)],
        fp16_partitioned_groups=[[torch.zeros(2)], [torch.zeros(3)]],
        unflatten=lambda flat, tensors: [flat],
    )
    saved = {
        "optimizer_state_dict": {
            "state": {0: {"step": torch.tensor(5.0)}, 1: {"step": torch.tensor(5.0)}},
            "param_groups": [{"weight_decay": 0.05, "params": [0]}, {"weight_decay": 0.0, "params": [1]}],
        }
    }
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "zero").mkdir()
        torch.save(saved, Path(tmp) / "zero" / "optimizer_state.pt")
        DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3(fake, tmp)
    groups, state = fake.optimizer.param_groups, fake.optimizer.state
    copied_decay = groups[1].get("weight_decay") == 0.05
    shared_step = state[flat_a].get("step") is state[flat_b].get("step")
    return (
        copied_decay and shared_step,
        f"group 1 decay {groups[1].get('weight_decay')}, shared step {shared_step}",
    )


@canary
def scalar_grad_clip() -> tuple[bool, str]:
    from deepspeed.runtime.utils import clip_grad_norm_

    p = nn.Parameter(torch.tensor(2.0))
    p.grad = torch.tensor(3.0)
    return _raises(lambda: clip_grad_norm_([p], max_norm=1.0), "doesn't match the broadcast shape")


@canary
def scalar_zero3_init() -> tuple[bool, str]:
    import deepspeed.comm as dist
    from deepspeed.runtime.zero.partition_parameters import Init

    fake = SimpleNamespace(
        _convert_to_deepspeed_param=lambda p: None, get_partition_dp_group=lambda p: dist.get_world_group()
    )
    return _raises(lambda: Init._zero_init_param(fake, nn.Parameter(torch.tensor(1.0))), "cannot be 0")


@canary
def comm_backend_reset() -> tuple[bool, str]:
    import deepspeed
    import deepspeed.comm.comm as ds_comm
    import torch.distributed as tdist

    stale = ds_comm.cdb
    tdist.destroy_process_group()
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, dist_init_required=False)
    reused = ds_comm.cdb is stale
    return reused, "the destroyed group's backend object is reused" if reused else "a new backend was made"


def main(out: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as tdist

    results = {}
    for name in ("scalar_broadcast", "scalar_universal_merge", "zero3_universal_param_groups"):
        results[name] = CANARIES[name]()
    # the rest need DeepSpeed's comm layer: a 1-rank gloo group on an in-memory store
    tdist.init_process_group(
        "gloo", store=tdist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=60)
    )
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, dist_init_required=False)
    for name in ("scalar_grad_clip", "scalar_zero3_init", "comm_backend_reset"):
        results[name] = CANARIES[name]()
    tdist.destroy_process_group()
    Path(out).write_text(
        json.dumps({k: {"present": bool(v[0]), "detail": v[1]} for k, v in results.items()}, indent=1)
    )


if __name__ == "__main__":
    main(sys.argv[1])
