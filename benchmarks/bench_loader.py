"""Data loader throughput against a tight single-process decode loop and raw reading of the same shards, local
and through the S3 API (moto), next to the tiny tri-modal model's training rate.

    .venv/bin/python benchmarks/bench_loader.py            # ~1-2 min on 2 CPU cores

Prints samples/s and the ratios loader / tight loop, loader / raw read and loader / model. The tight loop is the
reference a loader should approach per worker: one process reads the local tars with ``tarfile`` and decodes
every sample (Pillow jpg -> normalised float tensor at the model's image size, soundfile wav -> tensor, utf-8 ->
ids) into padded batches, with no sampling order, fault handling or workers. The model rate is measured exactly as
``bench_train.py`` measures its plain PyTorch loop (same function: task loss, backward, clipping, AdamW), on a
batch from these shards. The S3 rows start a local moto server (the ``moto[server]`` test extra).
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.fixtures_s3 (the moto server helper)

from benchmarks.bench_train import plain_training_rate  # noqa: E402
from mmt.config import load_config  # noqa: E402
from mmt.data import storage  # noqa: E402
from mmt.data.loader import build_train_loader  # noqa: E402
from mmt.data.shards import iter_tar_samples  # noqa: E402
from mmt.data.synthetic import write_synthetic_shards  # noqa: E402

MODEL = ROOT / "configs/model/tiny_tri.yaml"


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


def tight_loop_rate(paths: list[str], batch: int, cfg) -> float:
    """Samples/s of the reference loop: tarfile + Pillow + soundfile + utf-8 ids into padded batches, one process."""
    import soundfile
    from PIL import Image

    size = cfg.model.image.image_size
    mean = torch.tensor(cfg.data.image.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(cfg.data.image.std, dtype=torch.float32).view(-1, 1, 1)
    max_text = cfg.model.text.max_len
    max_audio = int(cfg.model.audio.max_seconds * cfg.model.audio.sample_rate)

    def collate(rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        b = len(rows)
        ids = torch.zeros(b, max(len(r[0]) for r in rows), dtype=torch.long)
        wav = torch.zeros(b, max_audio)  # fixed length, as the loader pads
        for i, (t, _, a) in enumerate(rows):
            ids[i, : len(t)] = t
            wav[i, : len(a)] = a
        return {"text": ids, "image": torch.stack([r[1] for r in rows]), "audio": wav}

    t0, n, rows, sample = time.perf_counter(), 0, [], {}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar:
                key, _, ext = member.name.rpartition(".")
                sample[ext] = tar.extractfile(member).read()
                if len(sample) < 4:  # jpg, json, txt, wav: a sample's members are adjacent
                    continue
                img = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
                if img.size != (size, size):
                    img = img.resize((size, size), Image.Resampling.BICUBIC)
                x = (
                    torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
                    .permute(2, 0, 1)
                    .float()
                    .div_(255.0)
                )
                wav, _ = soundfile.read(io.BytesIO(sample["wav"]), dtype="float32")
                text = torch.tensor(list(sample["txt"].decode("utf-8").encode("utf-8")[:max_text]))
                rows.append((text, (x - mean) / std, torch.from_numpy(wav[:max_audio])))
                sample = {}
                if len(rows) == batch:
                    n += len(collate(rows)["text"])
                    rows = []
    return n / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=768)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--model-steps", type=int, default=8, help="timed steps per round of the model rate")
    p.add_argument("--no-s3", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(2)
    print(
        f"torch threads {torch.get_num_threads()}, {args.samples} samples (32x32 jpg, 0.5 s 8 kHz wav, text)"
    )
    rows: list[tuple[str, float, float]] = []  # (name, loader samples/s, raw tar samples/s)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        local = write_synthetic_shards(str(tmp / "local"), args.samples, 256, audio_seconds=0.5)
        cfg_path = tmp / "loader.yaml"
        cfg_path.write_text(f"model: {MODEL}\n")
        cfg = load_config(
            cfg_path,
            [f"data.train_urls={local['urls']}", "data.num_workers=0", f"data.cache_dir={tmp / 'c0'}"],
        )
        tight = tight_loop_rate(storage.expand(local["urls"]), args.batch, cfg)
        print(f"tight loop (tarfile + Pillow + soundfile + utf-8 ids, 1 process): {tight:.0f} samples/s")
        batch = next(iter(build_train_loader(cfg, 0, 1, args.batch)))
        model_sps = plain_training_rate(cfg, batch, steps=args.model_steps)
        sources = [("local", local["urls"])]
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
            sources.append(("s3 (moto)", remote["urls"]))
        for name, urls in sources:
            bps, raw_sps, _ = raw_read(storage.expand(urls))
            print(
                f"{name}: raw sequential read {bps / 1e6:.1f} MB/s, webdataset tar iteration {raw_sps:.0f} samples/s"
            )
            for kind, workers in (("indexed", 1), ("indexed", 2), ("streaming", 2)):
                cache = tmp / f"cache-{name[:2]}-{kind}-{workers}"  # fresh: S3 rows include the shard fetch
                overrides = [
                    f"data.train_urls={urls}",
                    f"data.num_workers={workers}",
                    f"data.loader={kind}",
                    f"data.cache_dir={cache}",
                    "data.shuffle_buffer=256",
                ]
                rate = loader_rate(cfg_path, overrides, args.batch, epochs=2)
                rows.append((f"{name} {kind} loader, {workers} worker(s)", rate, raw_sps))
        if server is not None:
            env.__exit__(None, None, None)
            server.__exit__(None, None, None)
    print()
    print(f"{'loader':<44} {'samples/s':>10} {'/ tight loop':>13} {'/ raw tar':>10} {'/ model':>8}")
    print(
        f"{'tight decode loop (local, 1 process)':<44} {tight:>10.0f} {1:>13.3f} {'':>10} {tight / model_sps:>8.2f}"
    )
    for name, rate, raw_sps in rows:
        print(
            f"{name:<44} {rate:>10.0f} {rate / tight:>13.3f} {rate / raw_sps:>10.3f} {rate / model_sps:>8.2f}"
        )
    print(f"{'tiny_tri training, plain loop (bench_train)':<44} {model_sps:>10.0f}")
    print(
        "'/ model' > 1: the loader keeps up with training on this machine; S3 rows are compared with the local loop"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
