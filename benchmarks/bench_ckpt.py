"""Peak memory and wall time of `mmt ckpt convert` against DeepSpeed's `zero_to_fp32`, on one ZeRO-3 checkpoint.

    .venv/bin/python benchmarks/bench_ckpt.py [--model configs/model/base_tri.yaml] [--nproc 2] [--workdir DIR]
    .venv/bin/python benchmarks/bench_ckpt.py --synthetic-gb 0.5 2   # peak RSS as the model grows

Makes a real ZeRO-3 checkpoint of the model (``torchrun -m mmt.ckpt.harness``, one training step, fp32), then
runs each converter in its own fresh process and reads that process's peak RSS from
``getrusage(RUSAGE_SELF)`` at its exit (memory-mapped file pages a process touches count too). A third process
that only imports torch and deepspeed gives the shared baseline. Both outputs are then compared tensor by
tensor (they must be identical). Prints the numbers and the ratios mmt / DeepSpeed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Each measured command runs inside this wrapper, which reports the wall time and its own peak RSS.
WRAPPER = """
import json, resource, sys, time
t = time.perf_counter()
import torch, deepspeed  # noqa: F401  (both converters need them; the baseline is just this)
mode, args = sys.argv[1], sys.argv[2:]
if mode == "mmt":
    from mmt.ckpt.cli import main
    rc = main(["convert", *args, "--no-progress"])
elif mode == "deepspeed":
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict
    # pickle output: its safetensors writer refuses tied weights (the decoder shares the text embedding)
    convert_zero_checkpoint_to_fp32_state_dict(args[0], args[1], safe_serialization=False, tag=args[2],
                                               max_shard_size=args[3])
    rc = 0
else:
    rc = 0
print("BENCH " + json.dumps({"rc": rc, "wall_s": time.perf_counter() - t,
                             "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(mode: str, *args: str) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, mode, *args], capture_output=True, text=True, env=env, cwd=REPO
    )
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    raise SystemExit(f"{mode} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")


def make_checkpoint(model: str, nproc: int, run_dir: Path) -> None:
    from mmt.ckpt.harness import launch_command, launch_env

    env = {**launch_env(), "DS_ACCELERATOR": "cpu"}
    cmd = launch_command(
        run_dir,
        nproc,
        "--model",
        model,
        "--zero-stage",
        "3",
        "--steps",
        "1",
        "--save-at",
        "1",
        "--global-batch",
        str(nproc),
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"making the checkpoint failed:\n{(proc.stdout + proc.stderr)[-3000:]}")


def make_synthetic_checkpoint(save_dir: Path, gb: float, world: int = 2) -> None:
    """A ZeRO-3 checkpoint of ``gb`` GB of fp32 weights in DeepSpeed's own file layout (what its ``save_checkpoint``
    writes for the model and optimizer states, minus the Adam moments), made without training anything: how both
    converters' memory grows with the model, beyond the sizes this machine can train."""
    from collections import OrderedDict

    import torch

    side = 2048  # 16 MiB fp32 layers, divisible by the world size: no ZeRO-3 padding
    layers = max(1, int(gb * 1e9 / (side * side * 4)))
    shapes = OrderedDict((f"layers.{i}.weight", torch.Size([side, side])) for i in range(layers))
    tag = save_dir / "global_step1"
    tag.mkdir(parents=True, exist_ok=True)
    ds_config = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
    for r in range(world):
        model_states = {
            "module": OrderedDict(),
            "buffer_names": [],
            "param_shapes": [shapes],
            "frozen_param_shapes": OrderedDict(),
            "shared_params": {},
            "frozen_param_fragments": OrderedDict(),
            "global_steps": 1,
            "dp_world_size": world,
            "mp_world_size": 1,
            "ds_config": ds_config,
            "ds_version": "0.19.8",
        }
        torch.save(model_states, tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        g = torch.Generator().manual_seed(r)
        flat = torch.randn(layers * side * side // world, generator=g)
        optim = {
            "optimizer_state_dict": {
                "zero_stage": 3,
                "partition_count": world,
                "fp32_flat_groups": [flat],
                "optimizer_state_dict": {"state": {}, "param_groups": []},
            },
            "ds_config": ds_config,
            "ds_version": "0.19.8",
        }
        torch.save(optim, tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        del flat, optim
    (save_dir / "latest").write_text("global_step1")


def synthetic_curve(sizes: list[float], work: Path, max_shard_size: str) -> None:
    """Peak RSS of both converters on synthetic checkpoints of growing size, side by side per size."""
    base = measure("baseline")
    print(
        f"{'fp32 weights':>14}{'zero_to_fp32 s':>16}{'mmt s':>8}{'zero_to_fp32 RSS+ MiB':>24}{'mmt RSS+ MiB':>14}"
    )
    for gb in sizes:
        save = work / f"synthetic_{gb}"
        shutil.rmtree(save, ignore_errors=True)
        make_synthetic_checkpoint(save, gb)
        for d in ("out_mmt", "out_ds"):
            shutil.rmtree(work / d, ignore_errors=True)
        ds = measure("deepspeed", str(save), str(work / "out_ds"), "global_step1", max_shard_size)
        ours = measure("mmt", str(save), str(work / "out_mmt"), "--max-shard-size", max_shard_size)
        compare(work / "out_mmt", work / "out_ds")
        weights_gb = sum(f.stat().st_size for f in (work / "out_mmt").glob("*.safetensors")) / 1e9
        above = lambda r: r["peak_rss_mb"] - base["peak_rss_mb"]  # noqa: E731
        print(
            f"{weights_gb:>11.2f} GB{ds['wall_s']:>16.1f}{ours['wall_s']:>8.1f}{above(ds):>24.0f}{above(ours):>14.0f}"
        )
        shutil.rmtree(save, ignore_errors=True)


def compare(ours: Path, theirs: Path) -> int:
    """Tensor-by-tensor equality of our safetensors output and DeepSpeed's pickled one; returns the count."""
    import torch
    from safetensors import safe_open

    from mmt.ckpt.pretrained import weight_files

    fa = weight_files(ours)
    ref: dict[str, torch.Tensor] = {}
    for f in sorted(theirs.glob("pytorch_model*.bin")):
        ref.update(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
    if set(fa) != set(ref):
        raise SystemExit(f"different tensor names: {sorted(set(fa) ^ set(ref))[:5]}")
    for k in fa:
        with safe_open(str(fa[k]), "pt") as x:
            if not torch.equal(x.get_tensor(k), ref[k]):
                raise SystemExit(f"{k}: values differ")
    return len(fa)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "configs/model/base_tri.yaml"))
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--max-shard-size", default="5GB", help="output shard limit, the same for both converters")
    p.add_argument(
        "--workdir", default=None, help="keep the checkpoint and outputs here (default: a temp dir)"
    )
    p.add_argument(
        "--synthetic-gb",
        type=float,
        nargs="+",
        default=None,
        help="instead: synthetic ZeRO-3 checkpoints of these sizes (GB of fp32 weights), peak RSS per size",
    )
    args = p.parse_args()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    if args.synthetic_gb:
        try:
            synthetic_curve(args.synthetic_gb, work, args.max_shard_size)
        finally:
            if not args.workdir:
                shutil.rmtree(work, ignore_errors=True)
        return 0
    run_dir = work / "run"
    try:
        t = time.perf_counter()
        if not (run_dir / "checkpoints" / "latest").is_file():
            make_checkpoint(args.model, args.nproc, run_dir)
        tag = (run_dir / "checkpoints" / "latest").read_text().strip()
        ckpt_bytes = sum(f.stat().st_size for f in (run_dir / "checkpoints" / tag).iterdir())
        print(
            f"checkpoint: {args.model}, ZeRO-3 on {args.nproc} ranks, {ckpt_bytes / 1e9:.2f} GB on disk "
            f"(made in {time.perf_counter() - t:.0f} s)"
        )
        for d in ("out_mmt", "out_ds"):
            shutil.rmtree(work / d, ignore_errors=True)
        base = measure("baseline")
        ds = measure(
            "deepspeed", str(run_dir / "checkpoints"), str(work / "out_ds"), tag, args.max_shard_size
        )
        ours = measure("mmt", str(run_dir), str(work / "out_mmt"), "--max-shard-size", args.max_shard_size)
        n = compare(work / "out_mmt", work / "out_ds")
        weights_mb = sum(f.stat().st_size for f in (work / "out_mmt").glob("*.safetensors")) / 2**20
        print(f"outputs identical: {n} tensors, {weights_mb:.0f} MiB of weights\n")
        print(f"{'':28}{'wall s':>10}{'peak RSS MiB':>16}{'RSS above import MiB':>24}")
        for name, r in (
            ("import torch+deepspeed", base),
            ("deepspeed zero_to_fp32", ds),
            ("mmt ckpt convert", ours),
        ):
            print(
                f"{name:28}{r['wall_s']:>10.1f}{r['peak_rss_mb']:>16.0f}{r['peak_rss_mb'] - base['peak_rss_mb']:>24.0f}"
            )
        above = lambda r: max(1.0, r["peak_rss_mb"] - base["peak_rss_mb"])  # noqa: E731
        print(
            f"\nratio mmt / deepspeed: wall time {ours['wall_s'] / ds['wall_s']:.2f}x, "
            f"peak RSS {ours['peak_rss_mb'] / ds['peak_rss_mb']:.2f}x, "
            f"RSS above import {above(ours) / above(ds):.2f}x"
        )
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
