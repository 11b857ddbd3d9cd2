"""Shuffle quality of the partitioned order against the full permutation: order figures, and demo loss curves.

    .venv/bin/python benchmarks/bench_shuffle_quality.py               # ~3 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_shuffle_quality.py --steps 0     # order figures only (seconds)

Part 1 (numpy only) prints `mmt.data.order_quality` figures -- distinct shards per global batch, the chance that two
samples of a global batch share a shard, the order's rank correlation with the storage order and with the next
epoch's order -- for the full permutation, shard windows and the partitioned order, on a LAION-like layout (64
shards x 1000 samples, global batch 256) and on the demo dataset's 7 shards (global batch 64).

Part 2 trains the demo config (`configs/train/demo.yaml`: tiny tri-modal model, CLIP loss, global batch 64) in one
process for ``--steps`` steps with the same seed, once per order (full permutation, data.partitions=2,
data.partitions=4 with shard_window=1, and the full permutation with another data seed: the run-to-run spread
that the sample order alone causes), and prints the training loss (mean of the logged values around each step)
and the held-out recall@1 and zero-shot accuracy at the end. Same seed, same model initialisation, same
steps: only the sample order differs.
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

import numpy as np

from mmt.data.indexed import epoch_order, partitioned_order
from mmt.data.order_quality import order_quality

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs/train/demo.yaml"


def orders(
    counts: np.ndarray, g: int, variants: list[tuple[str, int, int]], epoch: int
) -> list[tuple[str, np.ndarray]]:
    """(name, order) of each ``(name, partitions, shard_window)`` variant (partitions 0: the global order)."""
    out = []
    for name, p, w in variants:
        if p:
            out.append((name, partitioned_order(counts, 0, epoch, p, g // p, True, w)))
        else:
            out.append((name, epoch_order(counts, 0, epoch, True, w)))
    return out


def order_table(title: str, counts: np.ndarray, g: int, variants: list[tuple[str, int, int]]) -> None:
    print(f"\n{title}: {len(counts)} shards, {int(counts.sum())} samples, global batch {g}")
    print(
        f"  {'order':<38} {'shards/batch':>12} {'same-shard pairs':>16} {'corr. storage':>13} "
        f"{'corr. next epoch':>16} {'samples/epoch':>13}"
    )
    for (name, order), (_, nxt) in zip(orders(counts, g, variants, 0), orders(counts, g, variants, 1)):
        q = order_quality(counts, order, nxt, g)
        print(
            f"  {name:<38} {q.distinct_shards_per_batch:>12.1f} {q.same_shard_pair_rate:>16.4f} "
            f"{q.storage_correlation:>13.3f} {q.epoch_correlation:>16.3f} {len(order):>13}"
        )
    print(f"  (independent draws: same-shard pairs {1 / len(counts):.4f})")


def demo_counts(data: Path) -> np.ndarray:
    """Samples per demo training shard, from the index sidecars `mmt shards demo` writes."""
    idx = sorted((data / "train").glob("shard-*.tar.idx.json"))
    return np.array([len(json.loads(p.read_text())["samples"]) for p in idx], dtype=np.int64)


def train(data: Path, run_dir: Path, steps: int, extra: list[str]) -> dict:
    """One single-process `mmt train` of the demo config; its logged metrics by step and its final metrics."""
    overrides = [
        f"data.train_urls={data}/train/shard-{{000000..000006}}.tar",
        f"data.val_urls={data}/val/shard-000000.tar",
        f"train.run_dir={run_dir}",
        f"train.max_steps={steps}",
        "train.log_interval=5",
        "train.checkpoint_interval=0",
        "train.checkpoint_at_end=false",
        "train.progress_bar=false",
        "tracking.backend=none",
        *extra,
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mmt.train", str(DEMO_CONFIG), *overrides],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise SystemExit(f"mmt train {' '.join(extra)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"rows": rows, "seconds": time.perf_counter() - t0}


def loss_near(rows: list[dict], step: int, span: int) -> float:
    """Mean logged training loss over steps (step - span, step]: single logged values are noisy at batch 64."""
    vals = [r["train/loss"] for r in rows if "train/loss" in r and step - span < r["step"] <= step]
    return float(np.mean(vals)) if vals else float("nan")


def last(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return float(vals[-1]) if vals else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200, help="training steps per order (0: order figures only)")
    p.add_argument("--data", default="", help="demo data folder (default: built in a temp folder)")
    args = p.parse_args()

    laion = np.full(64, 1000, dtype=np.int64)
    order_table(
        "LAION-like layout",
        laion,
        256,
        [
            ("global, full permutation", 0, 0),
            ("global, shard_window=4", 0, 4),
            ("partitioned P=8, shard_window=0", 8, 0),
            ("partitioned P=8, shard_window=1", 8, 1),
            ("partitioned P=16, shard_window=1", 16, 1),
            ("partitioned P=32, shard_window=1", 32, 1),
        ],
    )
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        data = Path(args.data) if args.data else tmp / "demo"
        if not (data / "train").is_dir():
            from mmt.data.cli import main as shards_main

            shards_main(["demo", str(data)])
        demo_variants = [
            ("global, full permutation", 0, 0, []),
            ("partitioned P=2, shard_window=0", 2, 0, ["data.partitions=2"]),
            ("partitioned P=4, shard_window=1", 4, 1, ["data.partitions=4", "data.shard_window=1"]),
        ]
        order_table("demo dataset", demo_counts(data), 64, [(n, pp, w) for n, pp, w, _ in demo_variants])
        if args.steps <= 0:
            return 0

        marks = sorted({s for s in (10, 25, 50, 100, 150, 200, args.steps) if s <= args.steps})
        print(
            f"\ndemo training, one process, seed 0, {args.steps} steps of 64 (loss: mean over the 10 steps before)"
        )
        print(
            f"  {'order':<38} "
            + " ".join(f"{'step ' + str(s):>9}" for s in marks)
            + "  recall@1  zero-shot  s"
        )
        # the same order kind with another data seed: how far two runs differ from the sample order alone
        noise = [("global, full permutation, data.seed=1", 0, 0, ["data.seed=1"])]
        for i, (name, _, _, extra) in enumerate(demo_variants + noise):
            run = train(data, tmp / f"run-{i}", args.steps, extra)
            rows = run["rows"]
            losses = " ".join(f"{loss_near(rows, s, 10):>9.3f}" for s in marks)
            print(
                f"  {name:<38} {losses}  {last(rows, 'val/recall_at_1'):>8.3f}  "
                f"{last(rows, 'val/zero_shot_image_top1'):>9.3f}  {run['seconds']:.0f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
