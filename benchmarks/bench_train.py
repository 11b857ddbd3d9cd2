"""Training throughput of mmt's DeepSpeed step (ZeRO-0 and ZeRO-2) against a plain PyTorch loop, side by side.

Same model (configs/model/tiny_tri.yaml unless --model), same AdamW hyper-parameters and parameter groups, same
gradient clipping, same retrieval loss, and the same real batch (read once from synthetic shards with mmt's loader
and reused, so data loading is out of the measurement). One process on CPU. The variants take turns step by step
(A, B, C, A, B, C, ...) so a machine shared with other work slows all of them alike; the median round is reported.

    .venv/bin/python benchmarks/bench_train.py
    .venv/bin/python benchmarks/bench_train.py --batch 64 --steps 20 --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _batch(tmp: Path, model_cfg: str, n: int) -> dict:
    from mmt.config import load_config
    from mmt.data.loader import build_train_loader
    from tests.fixtures_train import write_config, write_shards

    urls = write_shards(tmp / "data", n, per_shard=n)
    cfg = load_config(
        write_config(tmp / "bench.yaml", train_urls=urls, run_dir=tmp / "run", train={"global_batch": n})
    )
    if model_cfg != str(ROOT / "configs/model/tiny_tri.yaml"):
        from mmt.config.loader import load_config as load
        from mmt.config.model import MultiModalConfig

        cfg.model = load(model_cfg, schema=MultiModalConfig)
    return next(iter(build_train_loader(cfg, 0, 1, n))), cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "configs/model/tiny_tri.yaml"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=15, help="timed optimizer steps per variant and round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    sys.path.insert(0, str(ROOT))
    import deepspeed
    import torch

    import mmt
    from mmt.training.batching import resolve_batch
    from mmt.training.distributed import setup_distributed
    from mmt.training.ds_compat import patch_deepspeed
    from mmt.training.ds_config import build_ds_config
    from mmt.training.optim import param_groups
    from mmt.training.tasks import build_task

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        batch, cfg = _batch(Path(tmp), args.model, args.batch)
    setup_distributed("cpu", "gloo", 600)
    patch_deepspeed()
    cfg.train.global_batch, cfg.train.micro_batch, cfg.train.grad_accum = args.batch, 0, 0
    task = build_task(cfg.model, cfg.train)
    dev, f32 = torch.device("cpu"), torch.float32
    opt = cfg.train.optimizer

    def fresh_model() -> torch.nn.Module:
        torch.manual_seed(0)
        return mmt.create_model(cfg.model)

    variants = {}
    for stage in (0, 2):
        cfg.train.zero_stage = stage
        ds = build_ds_config(cfg.train, resolve_batch(cfg.train, 1), dev)
        model = fresh_model()
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, opt.weight_decay), config=ds
        )

        def ds_step(engine=engine) -> None:
            res = task.step(engine, batch, dev, f32)
            engine.backward(res.loss)
            engine.step()

        variants[f"mmt DeepSpeed ZeRO-{stage}"] = ds_step

    plain = fresh_model()
    adamw = torch.optim.AdamW(
        param_groups(plain, opt.weight_decay), lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps
    )

    def plain_step() -> None:
        res = task.step(plain, batch, dev, f32)
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.train.grad_clip)
        adamw.step()
        adamw.zero_grad(set_to_none=True)

    variants["plain PyTorch loop"] = plain_step

    for fn in variants.values():
        for _ in range(args.warmup):
            fn()
    # Step-level interleaving: variant A, B, C, A, B, C, ...; a burst of load from other work hits all alike.
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        spent = dict.fromkeys(variants, 0.0)
        for _ in range(args.steps):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                spent[name] += time.perf_counter() - t0
        for name, v in spent.items():
            times[name].append(v)

    sps = {k: args.batch * args.steps / statistics.median(v) for k, v in times.items()}
    base = sps["plain PyTorch loop"]
    print(
        f"model {Path(args.model).name}: {mmt.create_model(cfg.model).num_parameters() / 1e6:.2f}M params | "
        f"batch {args.batch} | {args.steps} steps x {args.rounds} rounds | torch threads {torch.get_num_threads()}"
    )
    print(f"{'variant':<26}{'samples/s':>12}{'time/step ms':>15}{'overhead vs plain':>20}")
    for name, v in sps.items():
        print(f"{name:<26}{v:>12.1f}{1000 * args.batch / v:>15.1f}{base / v:>19.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
