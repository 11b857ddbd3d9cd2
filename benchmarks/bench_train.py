"""Training throughput of mmt's DeepSpeed step against plain PyTorch, side by side in one run.

One process (default): mmt's ZeRO-0 and ZeRO-2 step against a plain PyTorch loop. ``--ranks N``: N CPU processes
(gloo), mmt's ZeRO-0/1/2/3 step against what a user would pick instead, torch ``DistributedDataParallel`` and
FSDP2 (``torch.distributed.fsdp.fully_shard`` on every transformer block, then the root); ``--batch`` is then the
global batch, each rank takes its slice.

Same model (configs/model/tiny_tri.yaml unless --model), same AdamW hyper-parameters and parameter groups, same
gradient clipping, same retrieval loss (gathered over the ranks), and the same real batch (read once from synthetic
shards with mmt's loader and reused, so data loading is out of the measurement). The variants take turns step by
step (A, B, C, A, B, C, ...) so a machine shared with other work slows all of them alike; the median round is
reported (rank 0's clock; every step ends in collectives, so the ranks move together). Each row also splits the
step into its phases: forward (the task's loss), backward (autograd plus the engine's gradient hooks, bucket copies
and reduction), optimizer (clipping and its norm, AdamW, the engine's copies back into the parameters). The plain
loop and DDP/FSDP2 use torch's fused AdamW, which is what mmt hands DeepSpeed on CPU (`build_ds_config`), so the
ratios measure the engines and not a choice of optimizer kernel. ``--profile N`` adds a cProfile of N more steps
per variant (cumulative and own ms per step of DeepSpeed's, the optimizer's and mmt's functions), ``--zero
key=value`` sets a ``zero_optimization`` knob for every DeepSpeed variant (bucket sizes, overlap_comm, ...).

    .venv/bin/python benchmarks/bench_train.py
    .venv/bin/python benchmarks/bench_train.py --batch 64 --steps 20 --rounds 3 --threads 2
    .venv/bin/python benchmarks/bench_train.py --ranks 2 --steps 8 --rounds 3
    .venv/bin/python benchmarks/bench_train.py --model configs/model/base_tri.yaml --batch 4 --steps 4 --profile 2
    .venv/bin/python benchmarks/bench_train.py --zero contiguous_gradients=false --zero reduce_bucket_size=5e7
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _batch(tmp: Path, model_cfg: str, n: int) -> dict:
    """One real loader batch of ``n`` synthetic tri-modal samples for ``model_cfg``, and the run config."""
    from mmt.config import Config
    from mmt.config.loader import load_config
    from mmt.config.model import MultiModalConfig
    from mmt.data.loader import build_train_loader
    from mmt.data.synthetic import write_synthetic_shards

    cfg = Config()
    cfg.model = load_config(model_cfg, schema=MultiModalConfig)
    cfg.data.train_urls = write_synthetic_shards(str(tmp / "data"), n, per_shard=n)["urls"]
    cfg.data.num_workers, cfg.data.cache_dir = 0, str(tmp / "cache")
    cfg.train.run_dir, cfg.train.global_batch = str(tmp / "run"), n
    cfg.tracking.backend = "none"
    return next(iter(build_train_loader(cfg, 0, 1, n))), cfg


PHASES = ("forward", "backward", "optimizer")
Phases = tuple[
    float, float, float
]  # seconds: forward (task loss), backward (+ gradient reduction), optimizer step


def plain_step(task, model, batch: dict, train_cfg, forward=None, fused: bool = True) -> Callable[[], Phases]:
    """One plain PyTorch training step: task loss, backward, clip, AdamW (mmt's parameter groups and settings).

    ``forward``: the module called for the loss when it wraps ``model`` (DistributedDataParallel). ``fused``:
    torch's fused AdamW, the implementation mmt hands DeepSpeed on CPU (`build_ds_config`), so the comparison
    measures the engine, not a choice of optimizer kernel; ``False`` is torch's default (single-tensor on CPU).
    Returns the step's phase times."""
    import torch

    from mmt.training.optim import param_groups

    opt = train_cfg.optimizer
    adamw = torch.optim.AdamW(
        param_groups(model, opt.weight_decay),
        lr=opt.lr,
        betas=(opt.beta1, opt.beta2),
        eps=opt.eps,
        fused=fused or None,
    )
    dev = torch.device("cpu")

    def step() -> Phases:
        t0 = time.perf_counter()
        res = task.step(forward or model, batch, dev, torch.float32)
        t1 = time.perf_counter()
        res.loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        adamw.step()
        adamw.zero_grad(set_to_none=True)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    return step


def engine_step(task, engine, batch: dict) -> Callable[[], Phases]:
    """One mmt DeepSpeed step as the trainer runs it (task loss, ``engine.backward``, ``engine.step``)."""
    import torch

    from mmt.training.inputs import count_tokens
    from mmt.training.telemetry import StepMeter

    dev = torch.device("cpu")
    meter = StepMeter()

    def step() -> Phases:
        t0 = time.perf_counter()
        res = task.step(engine, batch, dev, torch.float32)
        t1 = time.perf_counter()
        engine.backward(res.loss)
        t2 = time.perf_counter()
        engine.step()
        meter.add(res.metrics)  # the trainer's per-step bookkeeping (no host sync)
        meter.tokens += count_tokens(res.kwargs, res.present, {})
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    return step


def interleaved_phase_times(
    variants: dict[str, Callable[[], Phases | None]], warmup: int, steps: int, rounds: int, barrier=None
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(seconds per round of ``steps`` steps, seconds per step in each of `PHASES` over all rounds) per variant,
    the variants taking turns step by step."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    # Step-level interleaving: variant A, B, C, A, B, C, ...; a burst of load from other work hits all alike.
    times: dict[str, list[float]] = {k: [] for k in variants}
    phases: dict[str, list[float]] = {k: [0.0] * len(PHASES) for k in variants}
    for _ in range(rounds):
        spent = dict.fromkeys(variants, 0.0)
        for _ in range(steps):
            for name, fn in variants.items():
                if barrier is not None:
                    barrier()  # each variant's steps start together on every rank
                t0 = time.perf_counter()
                parts = fn()
                spent[name] += time.perf_counter() - t0
                for i, sec in enumerate(parts or ()):
                    phases[name][i] += sec / (steps * rounds)
        for name, v in spent.items():
            times[name].append(v)
    return times, phases


def interleaved_times(
    variants: dict[str, Callable[[], Phases | None]], warmup: int, steps: int, rounds: int, barrier=None
) -> dict[str, list[float]]:
    """Seconds per round of ``steps`` steps, per variant, the variants taking turns step by step."""
    return interleaved_phase_times(variants, warmup, steps, rounds, barrier)[0]


def print_table(
    sps: dict[str, float], phases: dict[str, list[float]], batch: int, base: str, base_label: str
) -> None:
    """Samples/s, time per step, its phases and the overhead against the ``base`` variant, one row each."""
    head = "".join(f"{p + ' ms':>14}" for p in PHASES)
    print(f"{'variant':<30}{'samples/s':>11}{'step ms':>10}{head}{'vs ' + base_label:>14}")
    for name, v in sps.items():
        cols = "".join(f"{1000 * x:>14.1f}" for x in phases[name])
        print(f"{name:<30}{v:>11.1f}{1000 * batch / v:>10.1f}{cols}{sps[base] / v:>13.3f}x")


def profile_steps(fn: Callable[[], Phases | None], steps: int, top: int = 18) -> None:
    """cProfile ``steps`` calls of ``fn``; print the functions with the most cumulative time per step (ms),
    DeepSpeed's and the optimizer's own named, so what remains of the engine's overhead has a name."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        fn()
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    rows = []
    for (path, line, func), (_, ncalls, tottime, cumtime, _) in stats.items():
        if (
            "deepspeed" in path
            or "torch/optim" in path
            or "/mmt/training" in path
            or func.startswith("<method")
        ):
            where = path.split("site-packages/")[-1] if "site-packages" in path else Path(path).name
            rows.append((cumtime, tottime, ncalls, f"{where}:{line}({func})" if line else func))
    print(f"  {'cum ms/step':>11}{'own ms/step':>12}{'calls':>7}  function")
    for cum, own, n, name in sorted(rows, reverse=True)[:top]:
        print(f"  {1000 * cum / steps:>11.1f}{1000 * own / steps:>12.1f}{n // steps:>7}  {name}")


def plain_training_rate(cfg, batch: dict, steps: int = 15, warmup: int = 3, rounds: int = 3) -> float:
    """Samples/s of the plain PyTorch loop on ``batch``: the "plain PyTorch loop" row of this benchmark."""
    import torch

    import mmt
    from mmt.training.tasks import build_task

    torch.manual_seed(0)
    step = plain_step(build_task(cfg.model, cfg.train), mmt.create_model(cfg.model), batch, cfg.train)
    times = interleaved_times({"plain": step}, warmup, steps, rounds)["plain"]
    n = len(batch["keys"])
    return n * steps / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "configs/model/tiny_tri.yaml"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=15, help="timed optimizer steps per variant and round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: torch's default; per rank: cores/ranks)"
    )
    p.add_argument("--ranks", type=int, default=1, help="processes (gloo); >1 compares with DDP and FSDP2")
    p.add_argument(
        "--zero",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="extra zero_optimization setting for the DeepSpeed variants, e.g. --zero overlap_comm=true",
    )
    p.add_argument(
        "--profile", type=int, default=0, metavar="N", help="also cProfile N steps of each variant"
    )
    args = p.parse_args(argv)
    if args.ranks > 1:
        return _main_ranks(args)

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    import torch

    import mmt
    from mmt.training.batching import resolve_batch
    from mmt.training.distributed import setup_distributed
    from mmt.training.engine import build_ds_config, initialize_for_training
    from mmt.training.tasks import build_task

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        batch, cfg = _batch(Path(tmp), args.model, args.batch)
    setup_distributed("cpu", "gloo", 600)
    cfg.train.global_batch, cfg.train.micro_batch, cfg.train.grad_accum = args.batch, 0, 0
    task = build_task(cfg.model, cfg.train)
    dev = torch.device("cpu")

    def fresh_model() -> torch.nn.Module:
        torch.manual_seed(0)
        return mmt.create_model(cfg.model)

    variants = {}
    for stage in (0, 2):
        cfg.train.zero_stage = stage
        ds = build_ds_config(cfg.train, resolve_batch(cfg.train, 1), dev)
        ds["zero_optimization"].update(_zero_overrides(args.zero))
        engine = initialize_for_training(fresh_model(), cfg.train, ds)
        variants[f"mmt DeepSpeed ZeRO-{stage}"] = engine_step(task, engine, batch)

    variants["plain PyTorch loop"] = plain_step(task, fresh_model(), batch, cfg.train)
    times, phases = interleaved_phase_times(variants, args.warmup, args.steps, args.rounds)

    sps = {k: args.batch * args.steps / statistics.median(v) for k, v in times.items()}
    print(
        f"model {Path(args.model).name}: {mmt.create_model(cfg.model).num_parameters() / 1e6:.2f}M params | "
        f"batch {args.batch} | {args.steps} steps x {args.rounds} rounds | torch threads {torch.get_num_threads()}"
        + (f" | zero_optimization {_zero_overrides(args.zero)}" if args.zero else "")
    )
    print_table(sps, phases, args.batch, "plain PyTorch loop", "plain")
    for name, fn in variants.items() if args.profile else ():
        print(f"\ncProfile of {name}, {args.profile} steps:")
        profile_steps(fn, args.profile)
    return 0


def _zero_overrides(items: list[str]) -> dict:
    """``["overlap_comm=true", "reduce_bucket_size=5e8"]`` -> ``{"overlap_comm": True, ...}`` (values as JSON)."""
    import json

    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = json.loads(value) if value else True
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _main_ranks(args: argparse.Namespace) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    import torch.multiprocessing as mp

    if args.batch % args.ranks:
        print(f"bench_train: --batch {args.batch} is not divisible by --ranks {args.ranks}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        batch, cfg = _batch(Path(tmp), args.model, args.batch)
    port = _free_port()
    mp.spawn(_rank_main, args=(args, batch, cfg, port), nprocs=args.ranks, join=True)
    return 0


def _rank_main(rank: int, args: argparse.Namespace, batch: dict, cfg, port: int) -> None:
    """One rank: builds every variant on the same initial weights, times them step-interleaved."""
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(args.ranks),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(args.ranks),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    import mmt
    from mmt.model.block import TransformerBlock
    from mmt.training.batching import resolve_batch
    from mmt.training.distributed import setup_distributed, teardown_distributed
    from mmt.training.engine import build_ds_config, initialize_for_training
    from mmt.training.tasks import build_task

    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // args.ranks))
    _, _, created = setup_distributed("cpu", "gloo", 600)
    n = args.batch // args.ranks
    local = {
        k: (v[rank * n : (rank + 1) * n] if isinstance(v, (torch.Tensor, list)) else v)
        for k, v in batch.items()
    }
    cfg.train.global_batch, cfg.train.micro_batch, cfg.train.grad_accum = args.batch, 0, 0
    task = build_task(cfg.model, cfg.train)
    dev = torch.device("cpu")

    def fresh_model() -> torch.nn.Module:
        torch.manual_seed(0)
        return mmt.create_model(cfg.model)

    variants = {}
    for stage in (0, 1, 2, 3):
        cfg.train.zero_stage = stage
        ds = build_ds_config(cfg.train, resolve_batch(cfg.train, args.ranks), dev)
        ds["zero_optimization"].update(_zero_overrides(args.zero))
        engine = initialize_for_training(fresh_model(), cfg.train, ds)
        variants[f"mmt DeepSpeed ZeRO-{stage}"] = engine_step(task, engine, local)

    ddp_model = fresh_model()
    variants["torch DDP"] = plain_step(task, ddp_model, local, cfg.train, DistributedDataParallel(ddp_model))
    fsdp_model = fresh_model()
    for module in list(fsdp_model.modules()):
        # fully_shard refuses 0-d parameters (the contrastive temperature): the same value as a (1,) tensor.
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.dim() == 0:
                setattr(module, pname, torch.nn.Parameter(p.detach().reshape(1)))
    for module in fsdp_model.modules():
        if isinstance(module, TransformerBlock):
            fully_shard(module)
    fully_shard(fsdp_model)
    variants["torch FSDP2 (fully_shard)"] = plain_step(task, fsdp_model, local, cfg.train)
    times, phases = interleaved_phase_times(
        variants, args.warmup, args.steps, args.rounds, barrier=dist.barrier
    )

    if rank == 0:
        sps = {k: args.batch * args.steps / statistics.median(v) for k, v in times.items()}
        print(
            f"model {Path(args.model).name}: {fresh_model().num_parameters() / 1e6:.2f}M params | global batch "
            f"{args.batch} ({n} per rank) | {args.ranks} ranks, gloo, {torch.get_num_threads()} threads each | "
            f"{args.steps} steps x {args.rounds} rounds"
        )
        print_table(sps, phases, args.batch, "torch DDP", "DDP")
        sps_fsdp = sps["torch FSDP2 (fully_shard)"]
        print("time vs FSDP2: " + ", ".join(f"{k} {sps_fsdp / v:.3f}x" for k, v in sps.items()))
        sys.stdout.flush()
    teardown_distributed(created)


if __name__ == "__main__":
    sys.exit(main())
