"""Every work-around mmt applies to DeepSpeed, in one place, each tied to the DeepSpeed versions it was made for.

DeepSpeed 0.19 breaks on valid mmt models and checkpoints in a few narrow ways (listed in `WORKAROUNDS`, each
with the upstream behaviour it works around). The fixes patch private DeepSpeed symbols, so they are only trusted
on the DeepSpeed series they were tested with (`TESTED_SERIES`): on another version `check_version` refuses in one
line, unless ``MMT_ALLOW_UNTESTED_DEEPSPEED=1`` is set. ``tests/test_ds_compat.py`` runs one canary per
work-around against the installed DeepSpeed, calling the upstream function directly on tiny inputs: a canary that
fails says DeepSpeed fixed that bug, and which work-around to drop on an upgrade.

Callers never apply these by hand: `mmt.training.engine.initialize` calls `patch_deepspeed`, the universal
conversion calls `patch_ds_to_universal`, resume calls `fix_zero3_universal_load`, teardown calls
`reset_comm_backend`, `initialize` calls `reuse_cpu_grad_buffers` on each ZeRO-1/2 optimizer, and
`mmt.training.engine.destroy` calls `release_zero3_module`.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from mmt.config.errors import ConfigError

TESTED_SERIES = (
    0,
    19,
)  # major, minor of the DeepSpeed releases these work-arounds were written and tested on
ALLOW_UNTESTED_ENV = "MMT_ALLOW_UNTESTED_DEEPSPEED"


@dataclass(frozen=True)
class Workaround:
    """One patch: the DeepSpeed symbol it touches and the upstream behaviour that makes it necessary."""

    name: str
    patches: str
    upstream: str
    versions: str = "0.19.x (seen on 0.19.8)"


WORKAROUNDS: dict[str, Workaround] = {
    w.name: w
    for w in (
        Workaround(
            "scalar_broadcast",
            "deepspeed.runtime.engine.DeepSpeedEngine._broadcast_model",
            "syncs initial weights with dist.broadcast(p.data.view(torch.uint8)), which raises 'self.dim() "
            "cannot be 0 to view Float as Byte' for a 0-dim parameter (the CLIP temperature logit_scale)",
        ),
        Workaround(
            "scalar_grad_clip",
            "deepspeed.runtime.engine.clip_grad_norm_",
            "ZeRO-0 clipping multiplies every gradient in place by a [1]-shaped coefficient, which fails on a "
            "[]-shaped gradient",
        ),
        Workaround(
            "scalar_zero3_init",
            "deepspeed.runtime.zero.partition_parameters.Init._zero_init_param",
            "ZeRO-3 partitions each parameter after the same uint8-view broadcast, which raises for a 0-dim one",
        ),
        Workaround(
            "scalar_universal_merge",
            "deepspeed.checkpoint.ds_to_universal._merge_zero_shards",
            "ds_to_universal reshapes a ZeRO-1/2 parameter's merged fragments to its shape, then concatenates "
            "them along dim 0: 'zero-dimensional tensor cannot be concatenated' for a 0-dim parameter",
        ),
        Workaround(
            "zero3_universal_param_groups",
            "DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3 (after it)",
            "the ZeRO-3 universal load copies param group 0's hyper-parameters into every group (the no-decay "
            "group would decay) and gives every sub-group's Adam state the same 'step' tensor (torch's Adam then "
            "counts k steps per step with k sub-groups)",
        ),
        Workaround(
            "comm_backend_reset",
            "deepspeed.comm.comm.cdb",
            "torch.distributed.destroy_process_group() leaves DeepSpeed's cached comm backend in place, so a later "
            "run in the same process would start from the destroyed group's backend",
        ),
        Workaround(
            "cpu_grad_buffers",
            "DeepSpeedZeroOptimizer.setup_buckets / _release_ipg_buffers / copy_grads_in_partition / step / "
            "get_grad_norm_direct (per optimizer instance, CPU accelerator only)",
            "ZeRO-1/2 drops its gradient bucket and its partition gradient buffer after every backward and "
            "flattens the partition's gradients into a new tensor in every step, and takes each gradient's norm on "
            "a new float64 copy: free on a GPU (the caching allocator hands the same blocks back), but on CPU each "
            "is a fresh allocation that the kernel page-faults in on first write (base_tri, 124M params: ~2 s of a "
            "5 s step)",
        ),
        Workaround(
            "zero3_module_refs",
            "deepspeed.runtime.zero.parameter_offload.FWD_MODULE_STACK and the lru_cache of "
            "PartitionedParameterCoordinator.__params_to_release",
            "ZeRO-3 pushes the model onto the module-level FWD_MODULE_STACK when it sets up its hooks, and memoises "
            "__params_to_release in a class-level functools.lru_cache keyed by (coordinator, submodule); "
            "engine.destroy() clears neither, so the model, the zero.Init partitioning closures on its parameters "
            "and through them the data-parallel process group stay alive until interpreter exit (after a 2-rank "
            "run: two gloo groups, 6 worker threads per rank, left for shutdown to free)",
        ),
    )
}


def _series(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise ConfigError(f"deepspeed {version}", ALLOW_UNTESTED_ENV, "cannot read the DeepSpeed version")
    return int(m.group(1)), int(m.group(2))


def check_version(version: str | None = None) -> None:
    """Refuse a DeepSpeed outside `TESTED_SERIES` (the work-arounds patch its private code) unless
    ``MMT_ALLOW_UNTESTED_DEEPSPEED=1``; ``version`` defaults to the installed ``deepspeed.__version__``."""
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    if _series(version) == TESTED_SERIES or os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        return
    tested = ".".join(map(str, TESTED_SERIES))
    raise ConfigError(
        f"deepspeed {version}",
        ALLOW_UNTESTED_ENV,
        f"mmt's DeepSpeed work-arounds ({', '.join(WORKAROUNDS)}) are tested on DeepSpeed {tested}.x only; "
        f"install deepspeed=={tested}.* or set {ALLOW_UNTESTED_ENV}=1 (then run tests/test_ds_compat.py to see "
        "which work-arounds the new version still needs)",
    )


_PATCHED = False


def patch_deepspeed() -> None:
    """Apply the engine work-arounds (scalar_broadcast, scalar_grad_clip, scalar_zero3_init) once per process."""
    global _PATCHED
    if _PATCHED:
        return
    check_version()
    import deepspeed.runtime.engine as engine_mod
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.partition_parameters import Init

    DeepSpeedEngine._broadcast_model = _scalar_broadcast(DeepSpeedEngine._broadcast_model)
    engine_mod.clip_grad_norm_ = _scalar_grad_clip(engine_mod.clip_grad_norm_)
    Init._zero_init_param = _scalar_zero3_init(Init._zero_init_param)
    _PATCHED = True


def _scalar_broadcast(original: Any) -> Any:
    """scalar_broadcast: scalars take a 1-element shape (a view of the same storage) for the broadcast only."""

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

    return broadcast_model


def _scalar_grad_clip(original: Any) -> Any:
    """scalar_grad_clip: scalar gradients go in as 1-element views, so clipping scales them in place."""

    @functools.wraps(original)
    def clip_grad_norm_(parameters, *args, **kwargs):  # type: ignore[no-untyped-def]
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        if any(p.grad is not None and p.grad.dim() == 0 for p in params):
            params = [_GradView(p) if p.grad is not None and p.grad.dim() == 0 else p for p in params]
        return original(params, *args, **kwargs)

    return clip_grad_norm_


def _scalar_zero3_init(original: Any) -> Any:
    """scalar_zero3_init: DeepSpeed's own steps for one parameter, the broadcast on a 1-element view."""

    @functools.wraps(original)
    def zero_init_param(self, param):  # type: ignore[no-untyped-def]
        if param.dim() != 0:
            return original(self, param)
        import deepspeed.comm as dist

        self._convert_to_deepspeed_param(param)
        group = self.get_partition_dp_group(param)
        src = 0 if dist.get_world_group() == group else dist.get_global_rank(group, 0)
        dist.broadcast(param.data.reshape(1).view(torch.uint8), src, group)
        param.partition()

    return zero_init_param


class _GradView:
    """Stands in for a scalar parameter: ``.grad`` is a 1-element view, so in-place updates reach the real one."""

    def __init__(self, p: torch.Tensor) -> None:
        self.grad = p.grad.view(1)
        self.device = p.device


def patch_ds_to_universal() -> Any:
    """Apply scalar_universal_merge and return DeepSpeed's ``ds_to_universal`` module (forked workers inherit it).

    Scalar fragments stay 1-element 1-d: DeepSpeed's universal loader flattens every parameter before slicing out
    a rank's fragment, so it loads them unchanged."""
    check_version()
    from deepspeed.checkpoint import ds_to_universal as ds

    original = ds._merge_zero_shards
    if getattr(original, "_mmt_patched", False):
        return ds

    @functools.wraps(original)
    def merge_zero_shards(*args, **kwargs):  # type: ignore[no-untyped-def]
        slices = original(*args, **kwargs)
        return [s.reshape(1) if torch.is_tensor(s) and s.dim() == 0 else s for s in slices]

    merge_zero_shards._mmt_patched = True  # type: ignore[attr-defined]
    ds._merge_zero_shards = merge_zero_shards
    return ds


def fix_zero3_universal_load(engine: Any, saved_optimizer_state: dict[str, Any]) -> None:
    """zero3_universal_param_groups: after ``engine.load_checkpoint`` of a universal checkpoint under ZeRO-3, give
    each param group its saved hyper-parameters back and each sub-group its own copy of its saved Adam step.

    ``saved_optimizer_state``: the universal checkpoint's ``zero/optimizer_state.pt``. A saved run grouped
    differently raises ValueError (the checkpoint package names the file)."""
    check_version()
    saved = saved_optimizer_state.get("param_groups")
    zero_opt = engine.optimizer
    groups = zero_opt.optimizer.param_groups
    if not saved or len(saved) != len(groups):
        raise ValueError(
            f"{len(saved or [])} optimizer param group(s) saved, this run has {len(groups)}: "
            "the parameter grouping (e.g. weight-decay split) must match the saved run"
        )
    for group, old in zip(groups, saved):
        for key, value in old.items():
            if key != "params":
                group[key] = value
    saved_states = (saved_optimizer_state.get("optimizer_state_dict") or {}).get("state") or {}
    for i, flat in enumerate(zero_opt.fp32_partitioned_groups_flat):
        state = zero_opt.optimizer.state.get(flat)
        if state and torch.is_tensor(state.get("step")):
            step = saved_states.get(i, {}).get("step", state["step"])
            state["step"] = step.clone() if torch.is_tensor(step) else torch.tensor(float(step))


def reset_comm_backend() -> None:
    """comm_backend_reset: drop DeepSpeed's cached comm backend after the process group is destroyed, so a later
    run in this process (tests, notebooks) initialises a fresh one."""
    try:
        import deepspeed.comm.comm as ds_comm

        ds_comm.cdb = None
    except Exception:  # noqa: BLE001 - best effort: the process is usually exiting anyway
        pass


def reuse_cpu_grad_buffers(optimizer: Any) -> bool:
    """cpu_grad_buffers: keep a ZeRO-1/2 optimizer's per-step gradient buffers across steps on the CPU accelerator.

    DeepSpeed allocates three partition-sized buffers per step and frees them again: the gradient bucket (filled
    from the gradient hooks), ``grads_in_partition`` (this rank's gradients, copied out of the bucket) and the flat
    gradient partition ``step`` builds for the optimizer; the gradient norm copies each gradient to float64 first.
    Here a released buffer is handed to the next backward or
    step that needs one of its size instead of a fresh allocation, once no gradient view DeepSpeed keeps points
    into it any more (during gradient accumulation the first micro-step's gradients stay the accumulator, so that
    buffer waits for ``step``), and the float64 copies go one at a time into one kept buffer. Every value is written as before, in the same order: the numerics are
    bit-identical. The cost: up to two buffers per kind stay allocated between steps.

    Applies to a `DeepSpeedZeroOptimizer` (ZeRO-1/2) on the CPU accelerator without optimizer offload; returns
    whether it did (a no-op elsewhere: on a GPU the caching allocator already reuses the blocks)."""
    check_version()
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.runtime.zero.utils import get_norm_dtype

    if (
        not isinstance(optimizer, DeepSpeedZeroOptimizer)
        or get_accelerator().device_name() != "cpu"
        or optimizer.cpu_offload
        or optimizer.zenflow
        or getattr(optimizer, "_mmt_grad_buffers", None) is not None
    ):
        return False
    opt = optimizer
    pool: dict[tuple, list[torch.Tensor]] = {}  # released bucket / partition buffers by kind, newest last
    flat: dict[tuple, torch.Tensor] = {}  # step's flat gradient partitions by (dtype, numel): free after step
    setup_buckets, release_ipg_buffers = opt.setup_buckets, opt._release_ipg_buffers
    copy_grads_in_partition, step, flatten = opt.copy_grads_in_partition, opt.step, opt.flatten
    grad_norm = opt.get_grad_norm_direct

    def storages_in_use() -> set[int]:
        """The storages every gradient view DeepSpeed keeps points into."""
        views: list[Any] = []
        for group in opt.bit16_groups:
            views += [t for p in group for t in (p.grad, getattr(p, "grad_accum", None))]
        for kept in (opt.all_grad_tensors, opt.averaged_gradients):
            for tensors in kept.values():
                views += list(tensors or ())
        return {t.untyped_storage().data_ptr() for t in views if torch.is_tensor(t)}

    def take(key: tuple, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
        candidates = pool.get(key, [])
        busy = storages_in_use() if candidates else set()
        for i, buf in enumerate(candidates):
            if buf.shape == shape and buf.dtype == dtype and buf.untyped_storage().data_ptr() not in busy:
                return candidates.pop(i)
        return None

    def give(key: tuple, buf: torch.Tensor) -> None:
        kept = pool.setdefault(key, [])
        kept.append(buf)
        del kept[:-2]  # a dropped buffer still in use lives on through its views

    def setup_buckets_reusing() -> None:
        fresh = not opt.ready_for_gradients
        setup_buckets()  # its new buffers are torch.empty: never written, so dropping them costs nothing
        if fresh and opt.contiguous_gradients:
            for dtype, bucket in opt.ipg_buckets.items():
                for k, buf in enumerate(bucket.buffer):
                    kept = take(("bucket", dtype, k), buf.shape, buf.dtype)
                    if kept is not None:
                        bucket.buffer[k] = kept

    def release_ipg_buffers_keeping() -> None:
        if opt.contiguous_gradients:
            for dtype, bucket in opt.ipg_buckets.items():
                for k, buf in enumerate(bucket.buffer):
                    give(("bucket", dtype, k), buf)
            if opt.grads_in_partition is not None:
                give(("partition",), opt.grads_in_partition)
        release_ipg_buffers()

    def copy_grads_in_partition_reusing(param, group_idx=None):  # type: ignore[no-untyped-def]
        if opt.grads_in_partition is None and pool.get(("partition",)):
            total = sum(p.numel() for group in opt.params_in_partition for p in group)
            kept = take(("partition",), torch.Size([int(total)]), opt.dtype)  # what DeepSpeed would allocate
            if kept is not None:
                opt.grads_in_partition, opt.grads_in_partition_offset = kept, 0
        return copy_grads_in_partition(param, group_idx)

    def flatten_into_kept(tensors):  # type: ignore[no-untyped-def]
        # torch's _flatten_dense_tensors is cat(t.contiguous().view(-1)); the same copy, into a kept buffer
        tensors = [t.contiguous().view(-1) for t in tensors]
        if len(tensors) < 2 or any(t.dtype != tensors[0].dtype for t in tensors):
            return flatten(tensors)  # one tensor: a view, no copy; mixed dtypes: cat's type promotion
        key = (tensors[0].dtype, sum(t.numel() for t in tensors))
        out = flat.get(key)
        if out is None:
            out = flat[key] = torch.empty(key[1], dtype=key[0], device=tensors[0].device)
        return torch.cat(tensors, out=out)

    def grad_norm_reusing(gradients, params, norm_type=2):  # type: ignore[no-untyped-def]
        # DeepSpeed takes each gradient's norm on a fresh float64 copy (g.data.to(float64)): handed float64
        # copies made one at a time in one kept buffer, its .to() is a no-op and the norms see the same values
        if norm_type != 2 or get_norm_dtype() != torch.float64:
            return grad_norm(gradients, params, norm_type)
        gradients = list(gradients)
        largest = max((g.numel() for g in gradients), default=0)
        scratch = flat.get(("norm", largest))
        if scratch is None:
            scratch = flat[("norm", largest)] = torch.empty(largest, dtype=torch.float64)

        def as_float64():  # type: ignore[no-untyped-def]
            for g in gradients:
                if getattr(g, "_zero_padding", False) or g.dtype == torch.float64:
                    yield g
                else:
                    yield scratch[: g.numel()].view(g.shape).copy_(g)

        return grad_norm(as_float64(), params, norm_type)

    def step_reusing(closure=None):  # type: ignore[no-untyped-def]
        opt.flatten = flatten_into_kept  # only step's flattens: the gradient partitions, consumed within step
        try:
            return step(closure)
        finally:
            opt.flatten = flatten

    opt.setup_buckets = setup_buckets_reusing
    opt._release_ipg_buffers = release_ipg_buffers_keeping
    opt.copy_grads_in_partition = copy_grads_in_partition_reusing
    opt.step = step_reusing
    opt.get_grad_norm_direct = grad_norm_reusing
    opt._mmt_grad_buffers = {"pool": pool, "flat": flat}  # read by tests/ds_canaries.py
    return True


def release_zero3_module(module: Any) -> None:
    """zero3_module_refs: drop the references ZeRO-3 keeps to a destroyed engine's model (DeepSpeed's forward module
    stack and the coordinator's release memo), so the model, its parameters' partitioning closures and the process
    groups they hold can be freed at teardown. The memo is only a cache: a live engine refills it on demand."""
    try:
        from deepspeed.runtime.zero import parameter_offload
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
    except ImportError:  # pragma: no cover - DeepSpeed always ships them in the tested series
        return
    stack = parameter_offload.FWD_MODULE_STACK
    stack[:] = [m for m in stack if m is not module]
    memo = params_to_release_memo(PartitionedParameterCoordinator)
    if memo is not None:
        memo.cache_clear()


def params_to_release_memo(coordinator_cls: Any) -> Any:
    """The ``functools.lru_cache`` under ``__params_to_release`` (wrapped by DeepSpeed's NVTX decorator), or None."""
    fn = coordinator_cls.__dict__.get("_PartitionedParameterCoordinator__params_to_release")
    for _ in range(4):
        if fn is None or hasattr(fn, "cache_clear"):
            break
        cells = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())]
        fn = getattr(fn, "__wrapped__", None) or next((c for c in cells if callable(c)), None)
    return fn if hasattr(fn, "cache_clear") else None
