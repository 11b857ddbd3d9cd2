"""A plain DeepSpeed program (no mmt code) that trains small models and saves them with ``save_checkpoint``.

The checkpoint tools must handle checkpoints that mmt did not write; this program makes them the way any
DeepSpeed user would: default tags (``global_stepN``), DeepSpeed's own ``latest`` file, no ``mmt_meta.json``.

    torchrun --nproc_per_node 2 tests/ds_plain_program.py --out DIR --saves tied:3:fp32 frozen:2:fp32 ...
    torchrun --nproc_per_node 3 tests/ds_plain_program.py --out DIR --saves tied:3:fp32 --kill-save

Each save ``MODEL:STAGE:DTYPE`` trains a fresh model for 3 steps and saves into ``DIR/MODEL-zSTAGE-DTYPE/``; rank
0 also dumps the live parameters (gathered under ZeRO-3) to ``live.pt`` and then writes ``done``. With
``--kill-save`` the last model trains one more step and saves again, and rank 1 is SIGKILLed in the middle of
writing its optimizer file: a save killed half-way (the launch then fails, as it would in real life).
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

VOCAB, DIM, SEQ = 37, 12, 8


class TiedLM(nn.Module):
    """A tiny language model whose output head shares the embedding matrix, with int and float buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.randn(SEQ, DIM) * 0.02)
        self.block = nn.Sequential(nn.Linear(DIM, 3 * DIM), nn.GELU(), nn.Linear(3 * DIM, DIM))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight
        # 1 element, not 0-d: plain DeepSpeed cannot broadcast 0-d parameters on gloo
        self.temperature = nn.Parameter(torch.ones(1))
        self.register_buffer("position_ids", torch.arange(SEQ))
        self.register_buffer("scale", torch.linspace(0.5, 1.5, DIM))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.pos[self.position_ids[: ids.shape[1]]]
        h = h + self.block(self.norm(h)) * self.scale.to(h.dtype)
        logits = self.head(h) * self.temperature
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))


class FrozenNet(nn.Module):
    """A frozen backbone (embedding + linear) under a trainable head, with BatchNorm buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.backbone = nn.Linear(DIM, 17)
        for p in (*self.embed.parameters(), *self.backbone.parameters()):
            p.requires_grad_(False)
        self.bn = nn.BatchNorm1d(17)
        self.head = nn.Linear(17, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.backbone(self.embed(ids).mean(1))
        h = self.bn(h.float()).to(h.dtype)
        return nn.functional.cross_entropy(self.head(h).float(), ids[:, 0] % 5)


MODELS = {"tied": TiedLM, "frozen": FrozenNet}


def ds_config(stage: int, dtype: str, world: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "initial_scale_power": 8},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def live_state(engine, stage: int) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as the engine holds it (gathered from the partitions under ZeRO-3)."""
    module = engine.module
    params = list(module.parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters(params):
            return {k: v.detach().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def train(engine, steps: int, dtype: str, rank: int, start: int) -> None:
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 * step + rank)
        ids = torch.randint(0, VOCAB, (4, SEQ), generator=g)
        loss = engine(ids)
        engine.backward(loss)
        engine.step()


def kill_while_writing_optimizer(engine, rank: int, out: Path) -> None:
    """Rank 1 dies half-way through its optimizer file (after rank 0's files are on disk)."""
    if rank != 1:
        return
    ce = engine.checkpoint_engine
    original = ce.save

    def save(state_dict, path):
        if str(path).endswith("optim_states.pt"):
            peer = Path(str(path).replace("zero_pp_rank_1_", "zero_pp_rank_0_"))
            deadline = time.time() + 30
            while not peer.is_file() and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
            buf = io.BytesIO()
            torch.save(state_dict, buf)
            data = buf.getvalue()
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return original(state_dict, path)

    ce.save = save


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--saves", nargs="+", required=True, help="MODEL:STAGE:DTYPE")
    p.add_argument("--kill-save", action="store_true")
    args = p.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.out)
    engine = None
    for spec in args.saves:
        name, stage, dtype = spec.split(":")
        stage = int(stage)
        torch.manual_seed(0)
        model = MODELS[name]()
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=trainable, config=ds_config(stage, dtype, world)
        )
        train(engine, 3, dtype, rank, 0)
        save_dir = out / f"{name}-z{stage}-{dtype}"
        engine.save_checkpoint(str(save_dir))
        live = live_state(engine, stage)
        dist.barrier()
        if rank == 0:
            torch.save(live, save_dir / "live.pt")
            (save_dir / "done").write_text("ok\n")
        dist.barrier()
    if args.kill_save and engine is not None:
        train(engine, 1, dtype, rank, 3)
        kill_while_writing_optimizer(engine, rank, out)
        engine.save_checkpoint(str(save_dir))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
