"""A small DeepSpeed training run of the tiny model that saves through mmt's `CheckpointManager`: the test bench of
`mmt.ckpt` (resume on other world sizes, conversion against the live weights).

Run it with ``python -m torch.distributed.run --nproc_per_node N -m tests.ckpt_harness --run-dir D --model CFG ...``
(`tests.fixtures_ckpt.run_harness`). Every step draws the same global batch on every world size (seeded by the
step) and rank ``r`` of ``W`` trains on its ``G/W`` slice, so a run on 2 ranks and a resumed run on 1 rank see
identical data and their losses can be compared step by step (the trainer's batches depend on the world size).
Losses (averaged over ranks) go to ``<run_dir>/losses.jsonl``; with ``--dump-live`` the live full parameters at
every save go to ``<run_dir>/live/<tag>.pt`` (gathered under ZeRO-3), the ground truth for the converter.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import mmt
from mmt.ckpt.client_state import ClientState
from mmt.ckpt.manager import CheckpointManager
from mmt.ckpt.resume import check_resumable, load_for_resume
from mmt.ckpt.torchio import checkpoint_loading
from mmt.config import Config, to_dict
from mmt.config.loader import load_config
from mmt.config.model import MultiModalConfig
from mmt.config.train import OptimizerConfig, TrainConfig
from mmt.precision import torch_dtype
from mmt.training.batching import BatchPlan
from mmt.training.engine import build_ds_config, destroy, initialize


def make_batch(
    cfg: dict[str, Any], step: int, global_batch: int, rank: int, world: int, seed: int
) -> dict[str, torch.Tensor]:
    """The global batch of ``step`` (identical on every world size), sliced to this rank."""
    g = torch.Generator().manual_seed(seed * 100003 + step)
    lo, hi = rank * global_batch // world, (rank + 1) * global_batch // world
    m = cfg["model"]
    batch: dict[str, torch.Tensor] = {}
    if m.get("text"):
        L = min(16, m["text"]["max_len"])
        batch["text_inputs"] = torch.randint(3, m["text"]["vocab_size"], (global_batch, L), generator=g)
        batch["text_attention_mask"] = torch.ones(global_batch, L, dtype=torch.bool)
    if m.get("image"):
        im = m["image"]
        batch["image_features"] = torch.randn(
            global_batch, im["channels"], im["image_size"], im["image_size"], generator=g
        )
    if m.get("audio"):
        au = m["audio"]
        n = int(au["sample_rate"] * au["max_seconds"] / 2)
        batch["audio_features"] = torch.randn(global_batch, n, generator=g) * 0.1
        batch["audio_attention_mask"] = torch.ones(global_batch, n, dtype=torch.bool)
    return {k: v[lo:hi] for k, v in batch.items()}


def compute_loss(module: nn.Module, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """A per-sample loss (mean over the local batch), so that the mean over ranks is the same number on every
    world size; an in-batch contrastive loss would change with the per-rank batch. It pulls each sample's
    modality embeddings together through the learned temperature, so every tensor gets a gradient."""
    inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.items()}
    out = module(**inputs)
    embs = [out.embeddings[m].float() for m in sorted(out.embeddings)]
    scale = out.logit_scale.float()
    loss = torch.zeros(())
    for i in range(len(embs)):
        for j in range(i + 1, len(embs)):
            cos = (embs[i] * embs[j]).sum(-1)
            loss = loss + nn.functional.softplus(1.0 - cos * scale / 10.0).mean()
    return loss


def ds_config(args: argparse.Namespace, world: int, load_universal: bool) -> dict[str, Any]:
    """The trainer's generated DeepSpeed config for these settings, plus DeepSpeed's own warmup schedule (its
    state is part of the checkpoint) and the universal-load switch."""
    train = TrainConfig(
        global_batch=args.global_batch,
        micro_batch=args.global_batch // world,
        grad_accum=1,
        zero_stage=args.zero_stage,
        precision=args.dtype,
        grad_clip=1.0,
        optimizer=OptimizerConfig(lr=args.lr, weight_decay=0.01),
    )
    plan = BatchPlan(args.global_batch, args.global_batch // world, 1, world)
    conf = build_ds_config(train, plan, torch.device("cpu"))
    conf["scheduler"] = {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": 0.0, "warmup_max_lr": args.lr, "warmup_num_steps": 3},
    }
    conf["checkpoint"] = {"load_universal": load_universal}
    return conf


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def live_state_dict(engine: Any, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 parameters as the engine holds them now (the fp32 master copy where one exists)."""
    import deepspeed

    module = engine.module
    out: dict[str, torch.Tensor] = {}
    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            for name, p in module.named_parameters():
                out[name] = p.detach().float().clone()
    else:
        for name, p in module.named_parameters():
            out[name] = p.detach().float().clone()
    persistent = set(module.state_dict())
    for name, b in module.named_buffers():
        if name in persistent:
            out[name] = b.detach().clone()
    return out


def dump_live(engine: Any, args: argparse.Namespace, name: str, rank: int) -> None:
    """Collective under ZeRO-3: rank 0 writes the live parameters to ``<run_dir>/live/<name>.pt``."""
    live = live_state_dict(engine, args.zero_stage)
    if rank == 0:
        (Path(args.run_dir) / "live").mkdir(parents=True, exist_ok=True)
        torch.save(live, Path(args.run_dir) / "live" / f"{name}.pt")


def save(
    engine: Any,
    manager: CheckpointManager,
    args: argparse.Namespace,
    step: int,
    cfg: dict[str, Any],
    world: int,
) -> None:
    """Collective: the trainer's save (`CheckpointManager`, `ClientState`) of this run's state at ``step``."""
    states: list[Any] = [None] * world
    dist.all_gather_object(states, rng_state())
    samples = step * args.global_batch
    client = ClientState(step=step, samples_seen=samples, rng_states=states, world_size=world)
    meta = {
        "step": step,
        "samples_seen": samples,
        "world_size": world,
        "zero_stage": args.zero_stage,
        "dtype": args.dtype,
        "mlflow_run_id": None,
        "config": cfg,
    }
    tag_dir = manager.save(engine, step, client.to_client_state(), meta)
    if args.dump_live:
        dump_live(engine, args, tag_dir.name, manager.rank)


def resume(engine: Any, plan: Any, args: argparse.Namespace, rank: int) -> int:
    """Load ``plan`` like the trainer (DeepSpeed's own loads through the allow-list); returns the step."""
    with checkpoint_loading(False):
        client = ClientState.from_client_state(load_for_resume(engine, plan))
    step = int(client.step)
    state = client.rank_rng(rank)
    if state is not None:
        set_rng_state(state)
    else:  # a rank the saved run did not have: a fresh stream derived from the seed, step and rank
        torch.manual_seed(args.seed * 7919 + step * 31 + rank)
    if args.dump_live:
        dump_live(engine, args, f"resumed_step_{step:08d}", rank)
    return step


def log_loss(
    engine: Any, args: argparse.Namespace, step: int, loss: torch.Tensor, world: int, rank: int
) -> None:
    mean = loss.detach().float().clone()
    dist.all_reduce(mean)
    mean /= world
    if rank == 0:
        rec = {
            "step": step,
            "loss": mean.item(),
            "world_size": world,
            "lr": engine.get_lr()[0],
            "engine_step": engine.global_steps,
        }
        with (Path(args.run_dir) / "losses.jsonl").open("a") as f:
            f.write(json.dumps(rec) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--model", required=True, help="a model config YAML")
    p.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--steps", type=int, default=4, help="train until this step")
    p.add_argument("--save-at", type=int, nargs="*", default=[2], help="steps after which to save")
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume-from", default=None, help="a run dir / checkpoint root to resume from")
    p.add_argument("--dump-live", action="store_true", help="also save the live parameters at every save")
    args = p.parse_args(argv)

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)
    mcfg = load_config(args.model, schema=MultiModalConfig)
    model, cfg = mmt.create_model(mcfg), to_dict(Config(model=mcfg))
    plan = None
    if args.resume_from:
        plan = check_resumable(args.resume_from, world_size=world, zero_stage=args.zero_stage, config=cfg)
    conf = ds_config(args, world, load_universal=bool(plan and plan.load_universal))
    # two groups like the trainer (no decay on vectors): the converter must handle several flat groups
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    engine = initialize(model, conf, model_parameters=groups)
    dtype = torch_dtype(args.dtype)
    manager = CheckpointManager(args.run_dir, keep_last=0, rank=rank)

    step = resume(engine, plan, args, rank) if plan is not None else 0
    if rank == 0:
        Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    while step < args.steps:
        loss = compute_loss(engine, make_batch(cfg, step, args.global_batch, rank, world, args.seed), dtype)
        engine.backward(loss)
        engine.step()
        step += 1
        log_loss(engine, args, step, loss, world, rank)
        if step in args.save_at:
            save(engine, manager, args, step, cfg, world)
    dist.barrier()
    destroy(engine)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
