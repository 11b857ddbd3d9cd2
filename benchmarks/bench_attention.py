"""Time and peak memory per token of each attention kind, forward + backward of one layer on CPU.

Each (kind, length) runs in a fresh subprocess so its peak resident memory is its own. Prints a table and the
linear, performer and reformer / dense ratios at each length. Dense ("mha") uses SDPA's fused kernel when no padding mask is given;
``--mask`` adds a padding mask (the score matrix is then materialised, O(N^2) memory).

    .venv/bin/python benchmarks/bench_attention.py                 # 256 .. 16k
    .venv/bin/python benchmarks/bench_attention.py --lengths 256 1024 4096
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

KINDS = ("mha", "sparse", "strided", "linear", "performer", "reformer")


def run_one(kind: str, n: int, dim: int, heads: int, mask: bool, repeats: int) -> dict:
    import resource
    import time

    import torch

    from mmt.config.model import AttentionConfig
    from mmt.model.registry import ATTENTION

    torch.manual_seed(0)
    # Reformer: about one chunk (64 tokens) per bucket, as in Kitaev et al.; Performer: 64 random features.
    buckets = max(2, 2 * (n // 128))
    cfg = AttentionConfig(
        kind=kind, window=64, num_global=4, stride=128, chunk_size=64, num_features=64, num_buckets=buckets
    )
    layer = ATTENTION.get(kind)(dim, heads, cfg)
    x = torch.randn(1, n, dim, requires_grad=True)
    pad = torch.ones(1, n, dtype=torch.bool) if mask else None
    if pad is not None:
        pad[:, n - n // 16 :] = False

    def step():
        layer(x, mask=pad).sum().backward()

    # Everything before the first step (interpreter, torch, the layer, the input) is the baseline; the
    # high-water mark after the steps minus it is what one forward + backward needed.
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up (allocator, kernels)
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    dt = (time.perf_counter() - t0) / repeats
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kind": kind, "n": n, "seconds": dt, "mem_kib": max(peak - base, 1)}


def measure(kind: str, n: int, args) -> dict:
    code = (
        "import json;from benchmarks.bench_attention import run_one;"
        f"print(json.dumps(run_one({kind!r},{n},{args.dim},{args.heads},{args.mask},{args.repeats})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return {
            "kind": kind,
            "n": n,
            "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed",
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--mask", action="store_true", help="use a padding mask (dense then materialises scores)")
    args = p.parse_args()

    import torch

    print(
        f"attention fwd+bwd, 1 layer, dim={args.dim}, heads={args.heads}, batch 1, torch threads="
        f"{torch.get_num_threads()}, mask={args.mask}"
    )
    print(f"{'N':>6} {'kind':>8} {'ms':>10} {'us/token':>9} {'peak MiB':>9} {'KiB/token':>10}")
    results: dict[tuple[str, int], dict] = {}
    for n in args.lengths:
        for kind in KINDS:
            r = measure(kind, n, args)
            results[(kind, n)] = r
            if "error" in r:
                print(f"{n:>6} {kind:>8}  error: {r['error']}")
                continue
            print(
                f"{n:>6} {kind:>8} {r['seconds'] * 1e3:10.1f} {r['seconds'] / n * 1e6:9.2f} "
                f"{r['mem_kib'] / 1024:9.1f} {r['mem_kib'] / n:10.2f}"
            )
    for kind in ("linear", "performer", "reformer"):
        print(f"\n{kind} / dense (mha) ratios:")
        print(f"{'N':>6} {'time':>8} {'memory':>8} {kind + ' KiB/token':>20}")
        for n in args.lengths:
            lin, den = results[(kind, n)], results[("mha", n)]
            if "error" in lin or "error" in den:
                continue
            print(
                f"{n:>6} {lin['seconds'] / den['seconds']:8.3f} {lin['mem_kib'] / den['mem_kib']:8.3f} "
                f"{lin['mem_kib'] / n:20.2f}"
            )


if __name__ == "__main__":
    main()
