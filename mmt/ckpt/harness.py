"""A small DeepSpeed training run that saves checkpoints in mmt's layout: the test bench of `mmt.ckpt`.

Run it with ``torchrun --nproc_per_node N -m mmt.ckpt.harness --run-dir D ...``. Every step draws the same
global batch on every world size (seeded by the step) and rank ``r`` of ``W`` trains on its ``G/W`` slice, so a
run on 2 ranks and a resumed run on 1 rank see identical data and their losses can be compared step by step.
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

from mmt.ckpt.client_state import ClientState
from mmt.ckpt.layout import CHECKPOINTS_DIR, tag_for_step, write_latest, write_meta
from mmt.config.train import OptimizerConfig, TrainConfig
from mmt.precision import torch_dtype
from mmt.training.batching import BatchPlan
from mmt.training.engine import build_ds_config, initialize


class ToyModel(nn.Module):
    """Odd-sized layers (ZeRO padding), a norm, a buffer: small, fast and awkward enough to catch slicing bugs."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(7, 13)
        self.norm = nn.LayerNorm(13)
        self.hidden = nn.Linear(13, 11)
        self.out = nn.Linear(11, 5, bias=False)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(self.norm(self.inp(x))))) * self.scale


def launch_command(run_dir: str | os.PathLike, nproc: int, *args: str) -> list[str]:
    """``torchrun --standalone --nproc_per_node N -m mmt.ckpt.harness --run-dir RUN_DIR ARGS``: the one way the
    tests and the benchmark start this harness."""
    import sys

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "mmt.ckpt.harness",
        "--run-dir",
        str(run_dir),
        *args,
    ]


def launch_env() -> dict[str, str]:
    """The caller's environment with DeepSpeed on CPU and its JIT-built ops cached beside the venv."""
    import sys

    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    return env


def toy_config() -> dict[str, Any]:
    return {"model": {"name": "toy", "layers": [7, 13, 11, 5]}}


def build_model(model: str) -> tuple[nn.Module, dict[str, Any]]:
    """``toy`` or a model config path for `mmt.create_model`; returns the module and the resolved config dict."""
    if model == "toy":
        return ToyModel(), toy_config()
    import mmt
    from mmt.config import Config, to_dict
    from mmt.config.loader import load_config
    from mmt.config.model import MultiModalConfig

    mcfg = load_config(model, schema=MultiModalConfig)
    return mmt.create_model(mcfg), to_dict(Config(model=mcfg))


def make_batch(
    model_name: str, cfg: dict[str, Any], step: int, global_batch: int, rank: int, world: int, seed: int
) -> dict[str, torch.Tensor]:
    """The global batch of ``step`` (identical on every world size), sliced to this rank."""
    g = torch.Generator().manual_seed(seed * 100003 + step)
    lo, hi = rank * global_batch // world, (rank + 1) * global_batch // world
    if model_name == "toy":
        x = torch.randn(global_batch, 7, generator=g)
        y = torch.randn(global_batch, 5, generator=g)
        return {"x": x[lo:hi], "y": y[lo:hi]}
    m = cfg["model"]
    batch: dict[str, torch.Tensor] = {}
    if m.get("text"):
        L = min(16, m["text"]["max_len"])
        ids = torch.randint(3, m["text"]["vocab_size"], (global_batch, L), generator=g)
        batch["text_inputs"] = ids
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


def compute_loss(
    model_name: str, module: nn.Module, batch: dict[str, torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    if model_name == "toy":
        x = batch["x"].to(dtype)
        return nn.functional.mse_loss(module(x).float(), batch["y"])
    inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.items()}
    out = module(**inputs)
    # A per-sample loss (mean over the local batch), so that the mean over ranks is the same number on every
    # world size; an in-batch contrastive loss would change with the per-rank batch. It pulls each sample's
    # modality embeddings together through the learned temperature, so every tensor gets a gradient.
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


def save(
    engine: Any, args: argparse.Namespace, step: int, cfg: dict[str, Any], world: int, rank: int
) -> None:
    root = Path(args.run_dir) / CHECKPOINTS_DIR
    tag = tag_for_step(step)
    states: list[Any] = [None] * world
    dist.all_gather_object(states, rng_state())
    client = ClientState(
        step=step, samples_seen=step * args.global_batch, rng_states=states, world_size=world
    )
    engine.save_checkpoint(str(root), tag=tag, client_state=client.to_client_state(), save_latest=False)
    live = live_state_dict(engine, args.zero_stage) if args.dump_live else None
    dist.barrier()
    if rank == 0:
        if live is not None:
            (Path(args.run_dir) / "live").mkdir(parents=True, exist_ok=True)
            torch.save(live, Path(args.run_dir) / "live" / f"{tag}.pt")
        write_meta(
            root / tag,
            {
                "step": step,
                "samples_seen": step * args.global_batch,
                "world_size": world,
                "zero_stage": args.zero_stage,
                "dtype": args.dtype,
                "mlflow_run_id": None,
                "config": cfg,
                "complete": True,
            },
        )
        write_latest(root, tag)
    dist.barrier()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--model", default="toy", help="'toy' or a model config YAML")
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
    model, cfg = build_model(args.model)

    plan = None
    if args.resume_from:
        from mmt.ckpt.resume import check_resumable

        plan = check_resumable(
            args.resume_from,
            world_size=world,
            zero_stage=args.zero_stage,
            config=cfg if args.model != "toy" else None,
        )
    conf = ds_config(args, world, load_universal=bool(plan and plan.load_universal))
    # two groups like the trainer (no decay on vectors): the converter must handle several flat groups
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    engine = initialize(model, conf, model_parameters=groups)
    dtype = torch_dtype(args.dtype)

    step = 0
    if plan is not None:
        from mmt.ckpt.resume import load_for_resume
        from mmt.ckpt.torchio import checkpoint_loading

        with checkpoint_loading(False):  # like the trainer: DeepSpeed's own loads go through the allow-list
            client = ClientState.from_client_state(load_for_resume(engine, plan))
        step = int(client.step)
        state = client.rank_rng(rank)
        if state is not None:
            set_rng_state(state)
        else:  # a rank the saved run did not have: a fresh stream derived from the seed, step and rank
            torch.manual_seed(args.seed * 7919 + step * 31 + rank)
        live = live_state_dict(engine, args.zero_stage) if args.dump_live else None
        if rank == 0 and live is not None:
            (Path(args.run_dir) / "live").mkdir(parents=True, exist_ok=True)
            torch.save(live, Path(args.run_dir) / "live" / f"resumed_{tag_for_step(step)}.pt")

    losses = Path(args.run_dir) / "losses.jsonl"
    if rank == 0:
        Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    while step < args.steps:
        batch = make_batch(args.model, cfg, step, args.global_batch, rank, world, args.seed)
        loss = compute_loss(args.model, engine, batch, dtype)
        engine.backward(loss)
        engine.step()
        step += 1
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        mean /= world
        if rank == 0:
            with losses.open("a") as f:
                f.write(
                    json.dumps(
                        {
                            "step": step,
                            "loss": mean.item(),
                            "world_size": world,
                            "lr": engine.get_lr()[0],
                            "engine_step": engine.global_steps,
                        }
                    )
                    + "\n"
                )
        if step in args.save_at:
            save(engine, args, step, cfg, world, rank)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
