"""GPU training throughput and MFU of mmt's DeepSpeed step for the base configs (bf16 by default).

Random inputs at the model's full lengths (77 text tokens, 224x224 images, full-length audio), the retrieval loss,
ZeRO-2 bf16, AdamW: the step the trainer runs, without data loading. MFU = training FLOPs per sample of the parts
the step runs (``model.flops_per_sample()``: the three towers for retrieval) x samples/s / (world size x the
GPU's peak bf16 FLOP/s from `mmt.training.flops`). Runs alone or under torchrun / the deepspeed launcher
(every rank gets its own batch).

    .venv/bin/python benchmarks/gpu_train.py                                  # base_tri, batch 64
    .venv/bin/python benchmarks/gpu_train.py --model configs/model/base_text_image.yaml --batch 128
    torchrun --nproc_per_node 8 benchmarks/gpu_train.py --zero 3
    .venv/bin/python benchmarks/gpu_train.py --device cpu --model configs/model/tiny_tri.yaml --peak-tflops 1

``--sweep`` is the prepared one-GPU run: base_tri and large_tri x ZeRO-2 / ZeRO-3 x activation checkpointing off / on
(bf16), each configuration in its own process, then mmt's loader samples/s on synthetic shards at the model's full
sizes, one table at the end. It finishes in under 8 minutes by construction: each configuration measures at most
``--max-seconds`` after its warmup and is stopped after ``--config-timeout`` seconds (8 x 50 s), the loader after 60 s
(a stopped or failed configuration is a row saying so). ``--dry-run`` runs the same sweep on CPU with tiny_tri, batch
2 and 2 steps (no CUDA anywhere), so the script is known to run before a GPU is lent:

    .venv/bin/python benchmarks/gpu_train.py --sweep                  # one H100/H200, <= 8 min
    .venv/bin/python benchmarks/gpu_train.py --sweep --dry-run        # CPU, ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def synthetic_batch(mcfg, b: int, device) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    batch: dict = {"keys": [f"s{i}" for i in range(b)]}
    if mcfg.text is not None:
        n = mcfg.text.max_len
        batch["text_inputs"] = torch.randint(3, mcfg.text.vocab_size, (b, n), generator=g)
        batch["text_attention_mask"] = torch.ones(b, n, dtype=torch.bool)
    if mcfg.image is not None:
        s = mcfg.image.image_size
        batch["image_features"] = torch.randn(b, mcfg.image.channels, s, s, generator=g)
    if mcfg.audio is not None:
        n = int(mcfg.audio.sample_rate * mcfg.audio.max_seconds)
        batch["audio_features"] = 0.1 * torch.randn(b, n, generator=g)
        batch["audio_attention_mask"] = torch.ones(b, n, dtype=torch.bool)
    return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "configs/model/base_tri.yaml"))
    p.add_argument("--batch", type=int, default=64, help="micro batch per GPU")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3))
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--peak-tflops", type=float, default=0.0, help="override the peak per device (TFLOP/s)")
    p.add_argument("--json", default="", help="also write the result here")
    p.add_argument("--max-seconds", type=float, default=0.0, help="stop timing after this long (0: no cap)")
    p.add_argument("--sweep", action="store_true", help="the prepared matrix, one process per configuration")
    p.add_argument("--dry-run", action="store_true", help="with --sweep: CPU, tiny_tri, batch 2, 2 steps")
    p.add_argument("--config-timeout", type=float, default=50.0, help="--sweep: seconds per configuration")
    p.add_argument("--loader-workers", type=int, default=8, help="--sweep: loader worker processes")
    args = p.parse_args(argv)
    if args.sweep:
        return sweep(args)

    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    import torch

    import mmt
    from mmt.config import TrainConfig
    from mmt.config.loader import load_config
    from mmt.config.model import MultiModalConfig
    from mmt.precision import torch_dtype
    from mmt.training.activation_checkpointing import apply_activation_checkpointing
    from mmt.training.batching import resolve_batch
    from mmt.training.distributed import any_rank, setup_distributed
    from mmt.training.engine import build_ds_config, initialize_for_training
    from mmt.training.flops import peak_flops_per_device
    from mmt.training.tasks import build_task

    env, device, _ = setup_distributed(args.device, "auto", 1800)
    mcfg = load_config(args.model, schema=MultiModalConfig)
    train = TrainConfig(
        global_batch=0,
        micro_batch=args.batch,
        grad_accum=1,
        zero_stage=args.zero,
        precision=args.precision,
        max_steps=args.warmup + args.steps,
    )
    torch.manual_seed(0)
    model = mmt.create_model(mcfg)
    if args.activation_checkpointing:
        apply_activation_checkpointing(model)
    task = build_task(mcfg, train)
    # counted before DeepSpeed (ZeRO-3 partitions parameters) and only for the parts a retrieval step runs
    flops = task.flops_per_sample(model.flops_per_sample())
    n_params = model.num_parameters()
    plan = resolve_batch(train, env.world_size)
    ds = build_ds_config(train, plan, device)
    engine = initialize_for_training(model, train, ds, train.max_steps)
    dtype = torch_dtype(args.precision)
    batch = synthetic_batch(mcfg, args.batch, device)

    def step() -> float:
        res = task.step(engine, batch, device, dtype)
        engine.backward(res.loss)
        engine.step()
        return float(res.metrics["loss"])

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, steps = time.perf_counter(), 0
    while steps < args.steps:
        loss = step()
        steps += 1
        # every rank stops at the same step (one small all-reduce per step with more than one rank)
        if args.max_seconds and steps >= 2 and any_rank(time.perf_counter() - t0 > args.max_seconds, device):
            break
    sync()
    elapsed = time.perf_counter() - t0
    samples_per_s = args.batch * env.world_size * steps / elapsed
    peak = peak_flops_per_device(device, args.precision, args.peak_tflops)
    result = {
        "model": Path(args.model).name,
        "params_M": round(n_params / 1e6, 2),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": env.world_size,
        "micro_batch": args.batch,
        "zero": args.zero,
        "precision": args.precision,
        "activation_checkpointing": args.activation_checkpointing,
        "steps": steps,
        "step_ms": round(1000 * elapsed / steps, 1),
        "samples_per_s": round(samples_per_s, 1),
        "train_gflops_per_sample": round(flops / 1e9, 2),
        "achieved_tflops_per_device": round(flops * samples_per_s / env.world_size / 1e12, 2),
        "peak_tflops_per_device": round(peak / 1e12, 1) if peak else None,
        "mfu": round(flops * samples_per_s / (env.world_size * peak), 4) if peak else None,
        "max_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
        "final_loss": round(loss, 4),
    }
    if env.rank == 0:
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


SWEEP_MODELS = ("base_tri", "large_tri")


def sweep(args: argparse.Namespace) -> int:
    """Every configuration of the prepared run in its own process (a failure or an out-of-memory is one row),
    then the loader's rate; one table."""
    dry = args.dry_run
    models = ("tiny_tri",) if dry else SWEEP_MODELS
    common = ["--precision", "fp32" if dry else args.precision]
    common += ["--batch", "2", "--steps", "2", "--warmup", "1", "--device", "cpu", "--peak-tflops", "1"] if dry else [
        "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", "3", "--max-seconds", "15"
    ]  # fmt: skip
    rows, t_start = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            for zero in (2, 3):
                for ac in (False, True):
                    out = Path(tmp) / f"{model}_z{zero}_ac{int(ac)}.json"
                    cmd = [sys.executable, __file__, "--model", str(ROOT / "configs/model" / f"{model}.yaml")]
                    cmd += ["--zero", str(zero), "--json", str(out), *common]
                    cmd += ["--activation-checkpointing"] if ac else []
                    status = _run(cmd, args.config_timeout)
                    row = (
                        json.loads(out.read_text())
                        if out.exists()
                        else {"model": f"{model}.yaml", "zero": zero}
                    )
                    row.update(activation_checkpointing=ac, status=status)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        loader = [
            sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import gpu_train; gpu_train.loader_rate()",
            str(Path(__file__).parent), models[0], str(1 if dry else args.loader_workers), str(16 if dry else 512),
            str(Path(tmp) / "loader.json"),
        ]  # fmt: skip
        status = _run(loader, 60.0 if not dry else args.config_timeout)
        loader_sps = (
            json.loads((Path(tmp) / "loader.json").read_text())["samples_per_s"] if status == "ok" else None
        )
    _print_sweep(
        rows, loader_sps, models[0], 1 if dry else args.loader_workers, time.perf_counter() - t_start
    )
    return 0 if all(r["status"] == "ok" for r in rows) and loader_sps else 1


def _run(cmd: list[str], timeout: float) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"stopped after {timeout:.0f} s"
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"failed: {last[:120]}"
    return "ok"


def loader_rate() -> None:
    """``python -c`` entry of `sweep`: mmt's training loader on synthetic shards at the model's image size and
    audio length, ``workers`` processes, samples/s from its first batch to its last (as bench_loader.py)."""
    model, workers, n, out = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
    from mmt.config import Config
    from mmt.config.loader import load_config
    from mmt.config.model import MultiModalConfig
    from mmt.data.loader import build_train_loader
    from mmt.data.synthetic import write_synthetic_shards

    cfg = Config()
    cfg.model = load_config(str(ROOT / "configs/model" / f"{model}.yaml"), schema=MultiModalConfig)
    audio = cfg.model.audio
    with tempfile.TemporaryDirectory() as tmp:
        cfg.data.train_urls = write_synthetic_shards(
            str(Path(tmp) / "data"),
            n,
            per_shard=max(1, n // 8),
            image_size=cfg.model.image.image_size,
            audio_seconds=audio.max_seconds,
            sample_rate=audio.sample_rate,
        )["urls"]
        cfg.data.num_workers, cfg.data.cache_dir = workers, str(Path(tmp) / "cache")
        cfg.train.run_dir, cfg.train.global_batch = str(Path(tmp) / "run"), min(32, n // 4)
        cfg.tracking.backend = "none"
        it = iter(build_train_loader(cfg, 0, 1, cfg.train.global_batch))
        next(it)
        t0, seen = time.perf_counter(), 0
        for batch in it:
            seen += len(batch["keys"])
        sps = seen / (time.perf_counter() - t0)
    out.write_text(json.dumps({"samples_per_s": round(sps, 1), "workers": workers}))


def _print_sweep(
    rows: list[dict], loader_sps: float | None, model: str, workers: int, seconds: float
) -> None:
    print(
        f"\n{'model':<16}{'ZeRO':>5}{'act.ckpt':>9}{'samples/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'mem GB':>8}  status"
    )
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        print(
            f"{r['model']:<16}{r['zero']:>5}{'on' if r['activation_checkpointing'] else 'off':>9}"
            f"{r.get('samples_per_s', '-'):>11}{r.get('achieved_tflops_per_device', '-'):>9}{mfu:>7}"
            f"{r.get('max_memory_gb') or '-':>8}  {r['status']}"
        )
    print(
        f"loader ({model} sizes, {workers} workers): {loader_sps or 'failed'} samples/s | sweep {seconds:.0f} s"
    )


if __name__ == "__main__":
    sys.exit(main())
