"""Wall time and peak memory of `mmt ckpt convert` against DeepSpeed's `zero_to_fp32`, as the model grows.

    .venv/bin/python benchmarks/bench_ckpt.py [--model configs/model/base_tri.yaml] [--repeats 3]
    .venv/bin/python benchmarks/bench_ckpt.py --synthetic-gb 0.5 1 2 4   # the base model, then synthetic sizes
    .venv/bin/python benchmarks/bench_ckpt.py --no-model --synthetic-gb 2 # synthetic sizes only

Makes a real ZeRO-3 checkpoint of the model (one training step through mmt's engine, fp32, saved by mmt's
``CheckpointManager``; this file under torchrun) and, with ``--synthetic-gb``, ZeRO-3 checkpoints of that many
GB of fp32 weights in DeepSpeed's file layout (no training).
On each, both converters run ``--repeats`` times, side by side (alternating which goes first), each in its own
fresh process, together with a process that only imports torch and deepspeed (the shared baseline).

Memory is the process's peak resident set (``VmHWM`` of ``/proc/self/status`` at exit: anonymous memory plus the
pages of memory-mapped files it touched), minus the baseline's. Not ``getrusage``'s ``ru_maxrss``: Linux carries
the parent's peak into a child across fork/exec, so a child of this (large) benchmark process would report at
least the parent's peak. The anonymous part (heap, tensors; no file pages) is sampled every 10 ms and printed
beside it. Both outputs are compared tensor by tensor (they must be identical). Prints a row per checkpoint with
the medians over the repeats and the median of the per-repeat ratios mmt / DeepSpeed, then the same rows as the
Markdown table the README shows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Each measured command runs inside this wrapper, which reports the wall time and its own peak memory.
WRAPPER = """
import json, resource, sys, threading, time
t = time.perf_counter()
import torch, deepspeed  # noqa: F401  (both converters need them; the baseline is just this)

def status():
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmHWM", "RssAnon"):
                    out[k] = int(v.split()[0]) / 1024
    except OSError:  # not Linux: ru_maxrss (may include a parent's peak), no anonymous split
        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out

anon = [status().get("RssAnon", 0.0)]
done = threading.Event()

def sample():
    while not done.wait(0.01):
        anon[0] = max(anon[0], status().get("RssAnon", 0.0))

threading.Thread(target=sample, daemon=True).start()
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
wall = time.perf_counter() - t
done.set()
end = status()
print("BENCH " + json.dumps({"rc": rc, "wall_s": wall, "peak_rss_mb": end["VmHWM"],
                             "peak_anon_mb": max(anon[0], end.get("RssAnon", 0.0))}))
"""


def measure(mode: str, *args: str) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, mode, *args], capture_output=True, text=True, env=env, cwd=REPO
    )
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            out = json.loads(line[6:])
            if out["rc"] != 0:
                break
            return out
    raise SystemExit(f"{mode} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")


def make_checkpoint(model: str, nproc: int, run_dir: Path) -> None:
    """A real ZeRO-3 checkpoint of ``model`` on ``nproc`` ranks: this file run under torchrun with
    ``--make-checkpoint`` (`train_one_step_and_save`)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += ["-m", "benchmarks.bench_ckpt", "--make-checkpoint", str(run_dir), "--model", model]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"making the checkpoint failed:\n{(proc.stdout + proc.stderr)[-3000:]}")


def train_one_step_and_save(model: str, run_dir: Path) -> None:
    """On every rank: one training step of ``model`` (fp32, ZeRO-3, one sample per rank) through mmt's engine and
    task loss, saved by mmt's `CheckpointManager` with the run's config in ``mmt_meta.json``, as `mmt train` does."""
    import torch

    import mmt
    from benchmarks.bench_train import _batch
    from mmt.ckpt.client_state import ClientState
    from mmt.ckpt.manager import CheckpointManager
    from mmt.config import to_dict
    from mmt.training.batching import resolve_batch
    from mmt.training.distributed import setup_distributed, teardown_distributed
    from mmt.training.engine import build_ds_config, destroy, initialize_for_training
    from mmt.training.tasks import build_task

    env, dev, created = setup_distributed("cpu", "gloo", 600)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            batch, cfg = _batch(Path(tmp), model, 1)
        world = env.world_size
        t = cfg.train
        t.zero_stage, t.precision, t.global_batch, t.micro_batch, t.grad_accum = 3, "fp32", world, 1, 1
        torch.manual_seed(0)
        engine = initialize_for_training(
            mmt.create_model(cfg.model), t, build_ds_config(t, resolve_batch(t, world), dev)
        )
        engine.backward(build_task(cfg.model, t).step(engine, batch, dev, torch.float32).loss)
        engine.step()
        client = ClientState(step=1, samples_seen=world, world_size=world)
        meta = {"step": 1, "samples_seen": world, "world_size": world, "zero_stage": 3, "dtype": "fp32"}
        manager = CheckpointManager(run_dir, keep_last=0, rank=env.rank)
        manager.save(engine, 1, client.to_client_state(), {**meta, "config": to_dict(cfg)})
        destroy(engine)
    finally:
        teardown_distributed(created)


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


def side_by_side(label: str, src: str, tag: str, work: Path, repeats: int, max_shard_size: str) -> dict:
    """Both converters ``repeats`` times on one checkpoint (alternating which runs first), outputs compared once.

    Returns the medians (wall s, peak RSS above the import baseline, its anonymous part) and the medians of the
    per-repeat ratios mmt / DeepSpeed: each pair ran back to back, so the ratio cancels the load of the moment.
    """
    runs: dict[str, list[dict]] = {"base": [], "ds": [], "mmt": []}
    for i in range(repeats):
        for d in ("out_mmt", "out_ds"):
            shutil.rmtree(work / d, ignore_errors=True)
        runs["base"].append(measure("baseline"))
        order = ("ds", "mmt") if i % 2 == 0 else ("mmt", "ds")
        for who in order:
            if who == "ds":
                runs["ds"].append(measure("deepspeed", src, str(work / "out_ds"), tag, max_shard_size))
            else:
                runs["mmt"].append(
                    measure(
                        "mmt", src, str(work / "out_mmt"), "--tag", tag, "--max-shard-size", max_shard_size
                    )
                )
        if i == 0:
            n = compare(work / "out_mmt", work / "out_ds")
            weights_gb = sum(f.stat().st_size for f in (work / "out_mmt").glob("*.safetensors")) / 1e9
    for d in ("out_mmt", "out_ds"):
        shutil.rmtree(work / d, ignore_errors=True)
    base_rss = statistics.median(r["peak_rss_mb"] for r in runs["base"])
    base_anon = statistics.median(r["peak_anon_mb"] for r in runs["base"])

    def med(who: str, key: str, minus: float = 0.0) -> float:
        return statistics.median(r[key] - minus for r in runs[who])

    ratio = lambda key, minus: statistics.median(  # noqa: E731
        max(1.0, m[key] - minus) / max(1.0, d[key] - minus) for m, d in zip(runs["mmt"], runs["ds"])
    )
    row = {
        "checkpoint": label,
        "tensors": n,
        "weights_gb": weights_gb,
        "repeats": repeats,
        "ds_s": med("ds", "wall_s"),
        "mmt_s": med("mmt", "wall_s"),
        "time_ratio": statistics.median(m["wall_s"] / d["wall_s"] for m, d in zip(runs["mmt"], runs["ds"])),
        "ds_rss_mb": med("ds", "peak_rss_mb", base_rss),
        "mmt_rss_mb": med("mmt", "peak_rss_mb", base_rss),
        "rss_ratio": ratio("peak_rss_mb", base_rss),
        "ds_anon_mb": med("ds", "peak_anon_mb", base_anon),
        "mmt_anon_mb": med("mmt", "peak_anon_mb", base_anon),
        "base_rss_mb": base_rss,
    }
    print(
        f"{label}: {n} tensors, {weights_gb:.2f} GB of fp32 weights, outputs identical; medians of {repeats}: "
        f"zero_to_fp32 {row['ds_s']:.1f} s / {row['ds_rss_mb']:.0f} MiB, mmt {row['mmt_s']:.1f} s / "
        f"{row['mmt_rss_mb']:.0f} MiB above import ({base_rss:.0f} MiB); ratio mmt / zero_to_fp32: wall time "
        f"{row['time_ratio']:.2f}x, RSS above import {row['rss_ratio']:.2f}x",
        flush=True,
    )
    return row


def markdown_table(rows: list[dict]) -> str:
    """The README's table: one row per checkpoint, medians and median ratios."""
    lines = [
        "| checkpoint | fp32 weights | `zero_to_fp32` s | `mmt ckpt convert` s | time ratio "
        "| `zero_to_fp32` RSS+ MiB | `mmt` RSS+ MiB | RSS ratio | anonymous RSS+ MiB (`zero_to_fp32` / `mmt`) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['checkpoint']} | {r['weights_gb']:.2f} GB | {r['ds_s']:.1f} | {r['mmt_s']:.1f} "
            f"| {r['time_ratio']:.2f}x | {r['ds_rss_mb']:.0f} | {r['mmt_rss_mb']:.0f} | {r['rss_ratio']:.2f}x "
            f"| {r['ds_anon_mb']:.0f} / {r['mmt_anon_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "configs/model/base_tri.yaml"))
    p.add_argument("--no-model", action="store_true", help="skip the trained model's checkpoint")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="runs of each converter per checkpoint (medians)")
    p.add_argument("--max-shard-size", default="5GB", help="output shard limit, the same for both converters")
    p.add_argument(
        "--workdir", default=None, help="keep the model checkpoint and outputs here (default: a temp dir)"
    )
    p.add_argument(
        "--synthetic-gb",
        type=float,
        nargs="+",
        default=[],
        help="also synthetic ZeRO-3 checkpoints of these sizes (GB of fp32 weights, 2 ranks, 16 MiB layers)",
    )
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--make-checkpoint", default=None, help=argparse.SUPPRESS)  # a rank of `make_checkpoint`
    args = p.parse_args()
    if args.make_checkpoint:
        train_one_step_and_save(args.model, Path(args.make_checkpoint))
        return 0
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    rows: list[dict] = []
    try:
        if not args.no_model:
            run_dir = work / "run"
            t = time.perf_counter()
            if not (run_dir / "checkpoints" / "latest").is_file():
                make_checkpoint(args.model, args.nproc, run_dir)
            tag = (run_dir / "checkpoints" / "latest").read_text().strip()
            ckpt_bytes = sum(f.stat().st_size for f in (run_dir / "checkpoints" / tag).iterdir())
            print(
                f"checkpoint: {args.model}, ZeRO-3 on {args.nproc} ranks, {ckpt_bytes / 1e9:.2f} GB on disk "
                f"(made in {time.perf_counter() - t:.0f} s)",
                flush=True,
            )
            label = f"{Path(args.model).stem} (trained, ZeRO-3, {args.nproc} ranks)"
            rows.append(
                side_by_side(
                    label, str(run_dir / "checkpoints"), tag, work, args.repeats, args.max_shard_size
                )
            )
        for gb in args.synthetic_gb:
            save = work / f"synthetic_{gb}"
            shutil.rmtree(save, ignore_errors=True)
            make_synthetic_checkpoint(save, gb)
            try:
                label = f"synthetic {gb:g} GB (ZeRO-3, 2 ranks)"
                rows.append(
                    side_by_side(label, str(save), "global_step1", work, args.repeats, args.max_shard_size)
                )
            finally:
                shutil.rmtree(save, ignore_errors=True)
        print("\n" + markdown_table(rows))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
