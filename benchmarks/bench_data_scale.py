"""S3 egress of one epoch on W = 1, 2, 4, 8 simulated nodes: the partitioned order against the global order.

    .venv/bin/python benchmarks/bench_data_scale.py            # ~5 min on the shared 2-core machine

Starts a moto S3 server on 127.0.0.1, writes many small synthetic shards to it, and runs one epoch of the indexed
training loader for every rank of W simulated nodes in turn (one rank per node, each with its own node-local
cache folder). Per W it prints bytes fetched from S3 / dataset bytes, whole-shard fetches per node, the readers'
cache hit rate (samples whose shard was already local) and samples/s per node -- for the partitioned order
(data.partitions=8, shard_window=1) with an unlimited cache and with data.cache_max_gb at 5 % of the dataset, and
for the global order's full permutation (data.partitions=0, shard_window=0) for comparison. Bytes are counted in
mmt's fetch path (every whole-shard download and range read; the small index sidecars are not counted). A last
section compares data.remote_read=range (one ranged GET per sample) with whole-shard reads on the first batches of
one rank.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the benchmarks package (benchmarks._moto, ...)

from benchmarks._moto import local_s3  # noqa: E402
from mmt.config import ConfigError, load_config  # noqa: E402
from mmt.data.indexed import epoch_order, partitioned_order  # noqa: E402
from mmt.data.iostats import COUNTERS  # noqa: E402
from mmt.data.loader import build_train_loader  # noqa: E402
from mmt.data.synthetic import write_synthetic_shards  # noqa: E402

MODEL = ROOT / "configs/model/tiny_tri.yaml"


def run_epoch(
    cfg_path: Path, overrides: list[str], rank: int, world: int, batch: int, limit: int = 0
) -> dict:
    """One epoch (or ``limit`` batches) of one rank: its I/O counters and samples/s (decode + collate included)."""
    COUNTERS.take()  # the ranks share this process: start each one from zero
    t_build = time.perf_counter()
    loader = build_train_loader(load_config(cfg_path, overrides), rank, world, batch)
    t0, n = time.perf_counter(), 0
    for i, b in enumerate(loader):
        n += len(b["keys"])
        if limit and i + 1 == limit:
            break
    elapsed = time.perf_counter() - t0
    loader.close()
    io = loader.io_stats()
    io["samples_per_s"] = n / elapsed
    io["setup_s"] = t0 - t_build
    io["dataset_bytes"] = sum(loader.dataset.catalog.sizes)
    return io


def scale_row(
    cfg_path: Path, base: list[str], tmp: Path, name: str, world: int, batch: int
) -> tuple[str, float | None]:
    """One table row (every rank of ``world`` nodes, one after the other) and its S3 / dataset ratio."""
    nodes = []
    slug = name.replace(" ", "_").replace(",", "").replace("%", "pct")
    for r in range(world):
        cache = tmp / f"cache-{slug}-w{world}-node{r}"  # node-local: empty at the start
        try:
            nodes.append(run_epoch(cfg_path, [*base, f"data.cache_dir={cache}"], r, world, batch))
        except ConfigError as e:  # the cap cannot hold the shards read at once: refused, never thrashing
            return f"{name:<40} {world:>2}  refused: {e.message.split(';')[0]}", None
    total = sum(n["bytes_fetched"] for n in nodes)
    hits = sum(n["cache_hits"] for n in nodes)
    reads = hits + sum(n["cache_misses"] for n in nodes)
    fetches = [int(n["shard_fetches"]) for n in nodes]
    sps = sum(n["samples_per_s"] for n in nodes) / world
    setup = sum(n["setup_s"] for n in nodes) / world
    ratio = total / nodes[0]["dataset_bytes"]
    row = (
        f"{name:<40} {world:>2} {ratio:>12.3f} {min(fetches):>6}-{max(fetches):<6} "
        f"{hits / max(reads, 1):>9.3f} {sps:>10.0f} {setup:>8.1f}"
    )
    return row, ratio


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=480)
    p.add_argument("--per-shard", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--worlds", default="1,2,4,8")
    p.add_argument("--range-batches", type=int, default=6)
    p.add_argument("--cache-fraction", type=float, default=0.05, help="node cache cap / dataset bytes")
    args = p.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp_, local_s3() as endpoint:
        tmp = Path(tmp_)
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="bench")
        t0 = time.perf_counter()
        # written locally, uploaded one by one over one connection (moto's server is fragile under bursts)
        local = write_synthetic_shards(str(tmp / "data"), args.shards * args.per_shard, args.per_shard)
        for f in sorted((tmp / "data").iterdir()):
            s3.upload_file(str(f), "bench", f"scale/{f.name}")
        data = {"urls": "s3://bench/scale/" + local["urls"].rsplit("/", 1)[1]}
        cfg_path = tmp / "bench.yaml"
        cfg_path.write_text(f"model: {MODEL}\n")
        common = [f"data.train_urls={data['urls']}", "data.num_workers=0"]
        probe = build_train_loader(
            load_config(cfg_path, [*common, f"data.cache_dir={tmp / 'probe'}"]), 0, 1, args.batch
        )
        dataset_bytes = sum(probe.dataset.catalog.sizes)
        five_pct = args.cache_fraction * dataset_bytes / 1e9
        print(
            f"{args.shards} shards x {args.per_shard} samples = {dataset_bytes / 1e6:.1f} MB on moto S3 "
            f"(written in {time.perf_counter() - t0:.0f} s); global batch {args.batch}, one epoch per rank, "
            f"one rank per node, DataLoader workers 0 (read-ahead thread on)"
        )
        part = [*common, f"data.partitions={args.partitions}", "data.shard_window=1"]
        configs = [
            (f"partitioned P={args.partitions}, cache unlimited", part, True),
            (
                f"partitioned P={args.partitions}, cache {args.cache_fraction:.0%}",
                [*part, f"data.cache_max_gb={five_pct}"],
                True,
            ),
            ("global full permutation, unlimited", common, False),
        ]
        print(
            f"\n{'order / node cache':<40} {'W':>2} {'S3 / dataset':>12} {'fetches/node':>13} {'hit rate':>9} "
            f"{'samples/s':>10} {'setup s':>8}"
        )
        worst = 0.0
        for name, overrides, aimed in configs:
            for w in worlds:
                row, ratio = scale_row(cfg_path, overrides, tmp, name, w, args.batch)
                print(row, flush=True)
                if aimed:
                    worst = max(worst, float("inf") if ratio is None else ratio)
        verdict = "met" if worst <= 1.05 else "NOT met"
        print(
            f"aim S3 / dataset <= 1.05 for the partitioned order at every W and cap: {verdict} (worst {worst:.3f})"
        )
        try:
            build_train_loader(
                load_config(
                    cfg_path, [*common, f"data.cache_max_gb={five_pct}", f"data.cache_dir={tmp / 'x'}"]
                ),
                0,
                1,
                args.batch,
            )
            print(f"global order (full permutation), cache {args.cache_fraction:.0%}: accepted")
        except ConfigError as e:
            print(f"global order (full permutation), cache {args.cache_fraction:.0%}: refused: {e}")

        counts = probe.dataset.catalog.counts
        print("\nshuffle: distinct shards per global batch (mean over epoch 0)")
        for name, order in (
            ("global order, full permutation", epoch_order(counts, 0, 0)),
            ("global order, shard_window=1", epoch_order(counts, 0, 0, shard_window=1)),
            (
                f"partitioned P={args.partitions}, shard_window=1",
                partitioned_order(counts, 0, 0, args.partitions, args.batch // args.partitions, True, 1),
            ),
        ):
            shard = np.searchsorted(np.cumsum(counts), order, side="right")
            nb = len(order) // args.batch
            per = [len(set(shard[b * args.batch : (b + 1) * args.batch].tolist())) for b in range(nb)]
            print(f"  {name:<36} {np.mean(per):6.1f} of {len(counts)} shards")

        print(
            "(more shuffle figures and the loss curves: benchmarks/bench_shuffle_quality.py)\n"
            f"\nrange reads vs whole shards: rank 0 of 1, first {args.range_batches} batches of the partitioned order"
        )
        for mode in ("shard", "range"):
            io = run_epoch(
                cfg_path,
                [*part, f"data.remote_read={mode}", f"data.cache_dir={tmp / ('r-' + mode)}"],
                0,
                1,
                args.batch,
                args.range_batches,
            )
            print(
                f"  remote_read={mode:<5}  {io['samples_per_s']:>7.0f} samples/s  "
                f"{io['bytes_fetched'] / 1e6:>7.2f} MB fetched  {int(io['shard_fetches'])} shard fetches  "
                f"{int(io['range_reads'])} range reads"
            )
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
