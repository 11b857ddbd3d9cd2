"""Data loader throughput vs raw reading of the same shards, local and through the S3 API (moto), next to the
tiny tri-modal model's training consumption (forward + backward + AdamW).

    .venv/bin/python benchmarks/bench_loader.py            # ~1-2 min on 2 CPU cores

Prints samples/s and the ratios loader / raw read and loader / model. The S3 rows start a local moto server
(the ``moto[server]`` test extra); the model row needs ``mmt.create_model`` and is skipped if it is missing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.fixtures_s3 (the moto server helper)

from mmt.config import load_config  # noqa: E402
from mmt.data import storage  # noqa: E402
from mmt.data.loader import build_train_loader  # noqa: E402
from mmt.data.shards import iter_tar_samples  # noqa: E402
from mmt.data.synthetic import write_synthetic_shards  # noqa: E402

MODEL = ROOT / "configs/model/tiny_tri.yaml"
FORWARD_KEYS = (
    "text_inputs",
    "text_attention_mask",
    "image_features",
    "audio_features",
    "audio_attention_mask",
)


def raw_read(urls: list[str]) -> tuple[float, float, int]:
    """Sequential whole-shard reads (bytes/s) and webdataset's tar iteration without decoding (samples/s)."""
    t0, nbytes = time.perf_counter(), 0
    for url in urls:
        nbytes += len(storage.read_bytes(url))
    t_bytes = time.perf_counter() - t0
    t0, n = time.perf_counter(), 0
    for url in urls:
        with storage.open_read(url) as stream:
            n += sum(1 for _ in iter_tar_samples(stream, url))
    return nbytes / t_bytes, n / (time.perf_counter() - t0), n


def loader_rate(cfg_path: Path, overrides: list[str], batch: int, epochs: int = 1) -> float:
    """Samples/s of the training loader (decode + collate), after its workers started (first batch excluded)."""
    cfg = load_config(cfg_path, overrides)
    loader = build_train_loader(cfg, 0, 1, batch)
    it = iter(loader)
    next(it)  # worker start-up and first fetches are not throughput
    t0, n = time.perf_counter(), 0
    for _ in range(epochs):
        for b in it:
            n += len(b["keys"])
        it = iter(loader)
    return n / (time.perf_counter() - t0)


def clip_loss(out) -> torch.Tensor:
    emb, scale = out.embeddings, out.logit_scale
    names = sorted(emb)
    loss = torch.zeros(())
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            logits = scale * emb[a] @ emb[b].T
            target = torch.arange(logits.shape[0])
            loss = (
                loss
                + (
                    torch.nn.functional.cross_entropy(logits, target)
                    + torch.nn.functional.cross_entropy(logits.T, target)
                )
                / 2
            )
    return loss


def model_rate(batch: dict, steps: int) -> float | None:
    try:
        import mmt

        model = mmt.create_model(str(MODEL))
    except Exception as e:  # the model package may not be importable yet
        print(f"(model column skipped: {type(e).__name__}: {e})")
        return None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs = {k: batch[k] for k in FORWARD_KEYS}
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        loss = clip_loss(model(**inputs))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * len(batch["keys"]) / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=768)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--model-steps", type=int, default=8)
    p.add_argument("--no-s3", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(2)
    print(
        f"torch threads {torch.get_num_threads()}, {args.samples} samples (32x32 jpg, 0.5 s 8 kHz wav, text)"
    )
    rows: list[
        tuple[str, float, float | None, float | None]
    ] = []  # (name, loader/s, raw samples/s, raw MB/s)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        local = write_synthetic_shards(str(tmp / "local"), args.samples, 256, audio_seconds=0.5)
        sources = [("local", local["urls"], "")]
        server = None
        if not args.no_s3:
            from tests.fixtures_s3 import aws_env, moto_server

            server = moto_server()
            endpoint = server.__enter__()
            env = aws_env(endpoint)
            env.__enter__()
            import boto3

            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
            remote = write_synthetic_shards("s3://bench/shards/", args.samples, 256, audio_seconds=0.5)
            sources.append(("s3 (moto)", remote["urls"], endpoint))
        last_batch = None
        for name, urls, _ in sources:
            shard_urls = storage.expand(urls)
            bps, raw_sps, n = raw_read(shard_urls)
            print(
                f"{name}: raw sequential read {bps / 1e6:.1f} MB/s, webdataset tar iteration {raw_sps:.0f} samples/s"
            )
            for kind, workers in (("indexed", 1), ("indexed", 2), ("streaming", 2)):
                cfg_path = tmp / f"{kind}.yaml"
                cfg_path.write_text(f"model: {MODEL}\n")
                cache = tmp / f"cache-{name[:2]}-{kind}-{workers}"  # fresh: S3 rows include the shard fetch
                overrides = [
                    f"data.train_urls={urls}",
                    f"data.num_workers={workers}",
                    f"data.loader={kind}",
                    f"data.cache_dir={cache}",
                    "data.shuffle_buffer=256",
                ]
                rate = loader_rate(cfg_path, overrides, args.batch, epochs=2)
                rows.append((f"{name} {kind} loader, {workers} worker(s)", rate, raw_sps, bps))
            if last_batch is None:
                cfg = load_config(
                    tmp / "indexed.yaml",
                    [f"data.train_urls={urls}", "data.num_workers=0", f"data.cache_dir={tmp / 'c0'}"],
                )
                last_batch = next(iter(build_train_loader(cfg, 0, 1, args.batch)))
        model_sps = model_rate(last_batch, args.model_steps)
        if server is not None:
            env.__exit__(None, None, None)
            server.__exit__(None, None, None)
    print()
    header = f"{'loader':<42} {'samples/s':>10} {'/ raw tar':>10}"
    header += f" {'/ model':>9}" if model_sps else ""
    print(header)
    for name, rate, raw_sps, _ in rows:
        line = f"{name:<42} {rate:>10.0f} {rate / raw_sps:>10.3f}"
        line += f" {rate / model_sps:>9.2f}" if model_sps else ""
        print(line)
    if model_sps:
        print(f"{'tiny_tri training (fwd+bwd+AdamW), batch ' + str(args.batch):<42} {model_sps:>10.0f}")
        print("ratio '/ model' > 1: the loader keeps up with training on this machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
