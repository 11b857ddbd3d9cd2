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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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
    args = p.parse_args(argv)

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
    from mmt.training.distributed import setup_distributed
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
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - t0
    samples_per_s = args.batch * env.world_size * args.steps / elapsed
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
        "step_ms": round(1000 * elapsed / args.steps, 1),
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


if __name__ == "__main__":
    sys.exit(main())
