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


@canary
def cpu_grad_buffers() -> tuple[bool, str]:
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    bucket, partition = torch.zeros(8), torch.zeros(6)
    fake = SimpleNamespace(
        contiguous_gradients=True,
        ipg_buckets={torch.float32: SimpleNamespace(buffer=[bucket], reuse_events={})},
        grads_in_partition=partition,
        grads_in_partition_offset=6,
        ready_for_gradients=True,
    )
    DeepSpeedZeroOptimizer._release_ipg_buffers(fake)  # the end of every backward
    dropped = fake.grads_in_partition is None and not fake.ipg_buckets[torch.float32].buffer
    views = [partition[:2].view(1, 2), partition[2:]]  # the step's gradient list: views of grads_in_partition
    flat = DeepSpeedZeroOptimizer.flatten_dense_tensors_aligned(
        SimpleNamespace(flatten=torch._utils._flatten_dense_tensors), views, 2
    )
    copied = flat.untyped_storage().data_ptr() != partition.untyped_storage().data_ptr()
    return (
        dropped and copied,
        f"buffers dropped after backward: {dropped}, step flattens into a new tensor: {copied}",
    )


@canary
def zero3_module_refs() -> tuple[bool, str]:
    """A 1-rank ZeRO-3 engine on a tiny model, 3 steps (the coordinator's trace completes), destroyed: does
    DeepSpeed still reference the model from its forward module stack and from the release memo?"""
    import deepspeed
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    from mmt.ds_compat import params_to_release_memo

    for key, value in (("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    config = {
        "train_batch_size": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    for _ in range(3):
        engine.backward(engine(torch.ones(2, 4)).sum())
        engine.step()
    engine.destroy()
    on_stack = any(m is model for m in parameter_offload.FWD_MODULE_STACK)
    memo = params_to_release_memo(PartitionedParameterCoordinator)
    in_memo = memo is not None and memo.cache_info().currsize > 0
    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if m is not model]
    if memo is not None:
        memo.cache_clear()
    return on_stack and in_memo, f"model on FWD_MODULE_STACK: {on_stack}, release memo filled: {in_memo}"


def reuse_check() -> dict[str, object]:
    """`mmt.ds_compat.reuse_cpu_grad_buffers` against DeepSpeed's own buffers: ZeRO-1 and ZeRO-2 engines (one
    rank, fp32, 2 micro-steps per step, a bucket smaller than one parameter) from the same weights and batches give
    bitwise the same losses, gradient norms and weights over 3 steps, and the kept buffers are the same memory in
    steps 2 and 3."""
    import deepspeed

    from mmt.ds_compat import reuse_cpu_grad_buffers

    for key, value in (("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)  # deepspeed.initialize asks for them; the group is already up

    def run(
        stage: int, reuse: bool
    ) -> tuple[list[float], list[float], list[torch.Tensor], list[list[int]], bool]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4))
        start = [p.detach().clone() for p in model.parameters()]
        groups = [
            {"params": [p for p in model.parameters() if p.dim() > 1], "weight_decay": 0.1},
            {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0},
        ]
        config = {
            "train_batch_size": 8,
            "train_micro_batch_size_per_gpu": 4,
            "gradient_accumulation_steps": 2,
            "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "torch_adam": True, "fused": True}},
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 100},
            "gradient_clipping": 0.5,
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 10**9,
        }
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
        applied = reuse_cpu_grad_buffers(engine.optimizer) if reuse else False
        assert applied == reuse
        losses, norms, ptrs = [], [], []
        data = torch.Generator().manual_seed(1)
        for _ in range(3):
            for _ in range(2):
                x, y = torch.randn(4, 8, generator=data), torch.randn(4, 4, generator=data)
                loss = nn.functional.mse_loss(engine(x), y)
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
            norms.append(float(engine.get_global_grad_norm()))
            if reuse:
                kept = engine.optimizer._mmt_grad_buffers
                ptrs.append(
                    sorted(t.data_ptr() for t in [*kept["flat"].values(), *sum(kept["pool"].values(), [])])
                )
        weights = [p.detach().clone() for p in engine.module.parameters()]
        engine.destroy()
        moved = all(not torch.equal(a, b) for a, b in zip(start, weights))
        return losses, norms, weights, ptrs, moved

    out: dict[str, object] = {}
    for stage in (1, 2):
        base, kept = run(stage, False), run(stage, True)
        out[f"zero{stage}_losses_equal"] = base[0] == kept[0]
        out[f"zero{stage}_norms_equal"] = base[1] == kept[1]
        out[f"zero{stage}_weights_equal"] = all(torch.equal(a, b) for a, b in zip(base[2], kept[2]))
        out[f"zero{stage}_weights_moved"] = base[4] and kept[4]
        out[f"zero{stage}_buffers_reused"] = len(kept[3][1]) >= 3 and kept[3][1] == kept[3][2]
        out[f"zero{stage}_detail"] = f"losses {kept[0]}, norms {kept[1]}, buffers {kept[3]}"
    return out


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
    for name in ("scalar_grad_clip", "scalar_zero3_init", "cpu_grad_buffers", "zero3_module_refs"):
        results[name] = CANARIES[name]()
    # patches only the optimizers it makes (before comm_backend_reset: that one leaves DeepSpeed's group cache stale)
    checks = reuse_check()
    results["comm_backend_reset"] = CANARIES["comm_backend_reset"]()
    verdicts = {k: {"present": bool(v[0]), "detail": v[1]} for k, v in results.items()}
    verdicts["reuse_check"] = checks
    tdist.destroy_process_group()
    Path(out).write_text(json.dumps(verdicts, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
