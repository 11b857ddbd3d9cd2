"""Eager vs exported (ONNX / TorchScript / torch.export) vs int8: latency, size, zero-shot accuracy side by side.

    python benchmarks/bench_export.py --run runs/demo-...   # a finished `mmt demo` run (its checkpoint and data)

Every variant is exported from the same checkpoint by `mmt export` into a temporary folder and measured in this
process on the same inputs: per tower, the median latency of a batch (default 32) over repeated calls after a
warm-up, with the same number of torch / onnxruntime threads; file size summed over the towers; zero-shot digit
accuracy on the demo's held-out split (`mmt.inference.digits`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import mmt
from mmt.export.exporter import export_model, load_export
from mmt.export.towers import example_inputs
from mmt.inference.digits import digit_zero_shot, held_out_digits, val_urls_of

VARIANTS = (
    ("onnx", ""),
    ("onnx", "int8"),
    ("torchscript", ""),
    ("torchscript", "int8"),
    ("exported-program", ""),
)


def median_ms(fn, inputs, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            fn(*inputs)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*inputs)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a finished mmt demo run folder")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    ort_threads = ort.SessionOptions()
    ort_threads.intra_op_num_threads = args.threads

    model, _ = mmt.create_model_and_transforms(args.run)
    data = held_out_digits(val_urls_of(args.run))
    towers = [m for m in ("text", "image", "audio") if m in model.encoders]
    inputs = {m: example_inputs(model.cfg, m, args.batch) for m in towers}

    def eager_encode(m, raw):
        with torch.no_grad():
            return getattr(model, f"encode_{m}")(raw)

    from mmt.export.towers import TowerEncoder

    eager_towers = {m: TowerEncoder(model, m).eval() for m in towers}
    rows = []
    size = sum(p.numel() * 4 for m in towers for p in eager_towers[m].parameters())
    acc = digit_zero_shot(eager_encode, data)
    lat = {m: median_ms(eager_towers[m], inputs[m], args.repeats) for m in towers}
    rows.append(("eager (fp32)", lat, size, acc))
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, q in VARIANTS:
            out = Path(tmp) / f"{fmt}{q}"
            export_model(args.run, out, fmt=fmt, quantize=q)
            ex = load_export(out)
            if fmt == "onnx":  # same thread count as torch
                for t in ex.towers.values():
                    t._run = ort.InferenceSession(
                        str(t.path), ort_threads, providers=["CPUExecutionProvider"]
                    )
            lat = {m: median_ms(ex.towers[m], inputs[m], args.repeats) for m in towers}
            size = sum((out / ex.meta["towers"][m]["file"]).stat().st_size for m in towers)
            rows.append((f"{fmt}{' int8' if q else ''}", lat, size, digit_zero_shot(ex.encode, data)))
    base = rows[0]
    head = f"{'variant':<22}" + "".join(f"{m + ' ms':>10}" for m in towers)
    head += f"{'vs eager':>10}{'MB':>8}{'zs image':>10}{'zs audio':>10}"
    print(
        f"batch {args.batch}, {args.threads} thread(s), median of {args.repeats}; {len(data[2])} held-out digits"
    )
    print(head)
    for name, lat, size, acc in rows:
        ratio = sum(lat.values()) / sum(base[1].values())
        line = f"{name:<22}" + "".join(f"{lat[m]:>10.2f}" for m in towers)
        line += f"{ratio:>10.2f}{size / 1e6:>8.2f}{acc['image']:>10.3f}{acc['audio']:>10.3f}"
        print(line)


if __name__ == "__main__":
    main()
