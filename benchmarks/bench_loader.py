"""Data loader throughput against a tight single-process decode loop that does the same work, and raw reading of
the same shards, local and through the S3 API (moto), next to the tiny tri-modal model's training rate.

    .venv/bin/python benchmarks/bench_loader.py            # ~1-2 min on 2 CPU cores

Prints samples/s and the ratios loader / tight loop, loader / raw read and loader / model. The tight loop is the
reference a loader should approach per worker: one process reads the local tars sequentially with ``tarfile`` and
turns every sample into exactly what the loader yields (asserted on a batch before timing): Pillow jpg ->
normalised float tensor at the model's image size, wav -> float waveform (the same `mmt.data.media` decoders),
json caption -> byte-tokenizer ids, padded batches with masks, labels; no sampling order, fault handling or
workers. Neither side augments (no random crop, first caption), so both do the same pixel work. The tight loop and
the local loaders take turns epoch by epoch (A, B, C, A, B, C, ...) and each row reports the median over rounds
of its rate and of its ratio to the tight loop's epoch next to it, so load from other work on a shared machine
hits both sides of a ratio alike. A loader's epoch is timed from its first batch to its last (the workers'
start-up and pipeline fill are not throughput). The model rate is ``bench_train.py``'s plain PyTorch loop, by the
same function on the same batch with the same step counts (task loss, backward, clipping, AdamW), so the two
benchmarks print one number. The S3 rows (a local moto server, the ``moto[server]`` test extra) are one epoch each
including the shards' fetch into an empty node cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the benchmarks package (benchmarks._moto, ...)

from benchmarks._moto import local_s3  # noqa: E402
from benchmarks.bench_train import _batch, plain_training_rate  # noqa: E402
from mmt.config import load_config  # noqa: E402
from mmt.data import media, storage  # noqa: E402
from mmt.data.loader import build_train_loader  # noqa: E402
from mmt.data.shards import iter_tar_samples  # noqa: E402
from mmt.data.synthetic import write_synthetic_shards  # noqa: E402
from mmt.text import build_tokenizer  # noqa: E402

MODEL = ROOT / "configs/model/tiny_tri.yaml"
NO_AUGMENTATION = [
    "data.image.crop_scale_min=1.0",
    "data.image.crop_ratio_max=1.0",
    "data.caption_choice=first",
]


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


def loader_epoch(loader) -> float:
    """Samples/s of one epoch of ``loader``, from its first batch to its last."""
    it = iter(loader)
    next(it)
    t0, n = time.perf_counter(), 0
    for b in it:
        n += len(b["keys"])
    return n / (time.perf_counter() - t0)


class TightLoop:
    """The reference: sequential ``tarfile`` reads and the loader's decode, normalisation and batch layout inline."""

    def __init__(self, paths: list[str], batch: int, cfg) -> None:
        self.paths, self.batch = paths, batch
        self.size = cfg.model.image.image_size
        self.mean = torch.tensor(cfg.data.image.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(cfg.data.image.std, dtype=torch.float32).view(-1, 1, 1)
        self.max_text = cfg.model.text.max_len
        self.max_audio = int(cfg.model.audio.max_seconds * cfg.model.audio.sample_rate)
        self.tokenizer = build_tokenizer(cfg.model.text.tokenizer)

    def sample(self, members: dict[str, bytes]) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        from PIL import Image

        meta = json.loads(members["json"])
        ids = torch.tensor(self.tokenizer.encode(meta["captions"][0], self.max_text), dtype=torch.long)
        img = media.decode_image(members["jpg"])
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        wav, _ = media.decode_audio(members["wav"])
        return (
            meta["key"],
            ids,
            (x - self.mean) / self.std,
            torch.from_numpy(wav[: self.max_audio]),
            meta["label"],
        )

    def collate(self, rows: list) -> dict:
        b = len(rows)
        text_len = torch.tensor([len(r[1]) for r in rows])
        audio_len = torch.tensor([len(r[3]) for r in rows])
        ids = torch.nn.utils.rnn.pad_sequence([r[1] for r in rows], batch_first=True)
        wav = torch.zeros(b, self.max_audio)
        wav[:, : int(audio_len.max())] = torch.nn.utils.rnn.pad_sequence(
            [r[3] for r in rows], batch_first=True
        )
        yes = torch.ones(b, dtype=torch.bool)
        return {
            "keys": [r[0] for r in rows],
            "text_inputs": ids,
            "text_attention_mask": torch.arange(ids.shape[1])[None] < text_len[:, None],
            "text_present": yes,
            "image_features": torch.stack([r[2] for r in rows]),
            "image_present": yes.clone(),
            "audio_features": wav,
            "audio_attention_mask": torch.arange(self.max_audio)[None] < audio_len[:, None],
            "audio_present": yes.clone(),
            "labels": torch.tensor([r[4] for r in rows], dtype=torch.long),
        }

    def batches(self):
        rows, members, key = [], {}, None
        for path in self.paths:
            with tarfile.open(path) as tar:
                for member in tar:
                    k, _, ext = member.name.partition(".")
                    if k != key and members:
                        rows.append(self.sample(members))
                        members = {}
                        if len(rows) == self.batch:
                            yield self.collate(rows)
                            rows = []
                    key, members[ext] = k, tar.extractfile(member).read()
        if members:
            rows.append(self.sample(members))
        if len(rows) == self.batch:
            yield self.collate(rows)

    def epoch(self) -> float:
        t0, n = time.perf_counter(), 0
        for b in self.batches():
            n += len(b["keys"])
        return n / (time.perf_counter() - t0)


def check_same_batch(tight: TightLoop, cfg_path: Path, overrides: list[str]) -> None:
    """The tight loop's first batch equals the loader's (unshuffled, in-process): the same work on both sides."""
    cfg = load_config(cfg_path, [*overrides, "data.shuffle=false", "data.num_workers=0"])
    ours = next(iter(build_train_loader(cfg, 0, 1, tight.batch)))
    ref = next(tight.batches())
    assert ref["keys"] == ours["keys"], (ref["keys"][:3], ours["keys"][:3])
    for k, v in ref.items():
        if k != "keys":
            assert v.dtype == ours[k].dtype and torch.equal(v, ours[k]), (
                f"tight loop and loader differ in {k}"
            )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=768)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument(
        "--rounds", type=int, default=5, help="interleaved epochs of the tight loop and each loader"
    )
    p.add_argument("--model-steps", type=int, default=15, help="timed steps per round of the model rate")
    p.add_argument("--no-s3", action="store_true")
    args = p.parse_args()
    print(
        f"torch threads {torch.get_num_threads()}, {args.samples} samples (32x32 jpg, 0.5 s 8 kHz wav, text), "
        f"batch {args.batch}, {args.rounds} interleaved rounds"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # the model rate first, alone: bench_train.py's batch, function and step counts
        model_batch, model_cfg = _batch(tmp / "model", str(MODEL), args.batch)
        model_sps = plain_training_rate(model_cfg, model_batch, steps=args.model_steps)
        local = write_synthetic_shards(str(tmp / "local"), args.samples, 256, audio_seconds=0.5)
        cfg_path = tmp / "loader.yaml"
        cfg_path.write_text(f"model: {MODEL}\n")
        base = [f"data.train_urls={local['urls']}", f"data.cache_dir={tmp / 'cache'}", *NO_AUGMENTATION]
        tight = TightLoop(storage.expand(local["urls"]), args.batch, load_config(cfg_path, base))
        check_same_batch(tight, cfg_path, base)
        variants = {
            f"local {kind} loader, {w} worker(s)": build_train_loader(
                load_config(cfg_path, [*base, f"data.num_workers={w}", f"data.loader={kind}"]),
                0,
                1,
                args.batch,
            )
            for kind, w in (("indexed", 1), ("indexed", 2), ("streaming", 2))
        }
        for loader in variants.values():
            loader_epoch(loader)  # workers started, files opened, caches warm
        tight.epoch()
        tight_rates: list[float] = []
        rates: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.rounds):
            for name, loader in variants.items():
                t = tight.epoch()
                tight_rates.append(t)
                rates[name].append((loader_epoch(loader), t))
        rows = [(name, [r for r, _ in v], [r / t for r, t in v]) for name, v in rates.items()]
        _, raw_sps, _ = raw_read(storage.expand(local["urls"]))
        raw = {name: raw_sps for name, *_ in rows}
        if not args.no_s3:
            rows += s3_rows(tmp, cfg_path, args, statistics.median(tight_rates), raw)
    tight_sps = statistics.median(tight_rates)
    print()
    print(
        f"{'loader':<44} {'samples/s':>10} {'/ tight loop':>13} {'(range)':>13} {'/ raw tar':>10} {'/ model':>8}"
    )
    print(
        f"{'tight decode loop (local, 1 process)':<44} {tight_sps:>10.0f} {1:>13.3f} {'':>13} {'':>10} "
        f"{tight_sps / model_sps:>8.2f}"
    )
    for name, sps, ratios in rows:
        rate, ratio = statistics.median(sps), statistics.median(ratios)
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}" if len(ratios) > 1 else ""
        print(
            f"{name:<44} {rate:>10.0f} {ratio:>13.3f} {spread:>13} {rate / raw[name]:>10.3f} "
            f"{rate / model_sps:>8.2f}"
        )
    print(f"{'tiny_tri training, plain loop (bench_train)':<44} {model_sps:>10.0f}")
    print(
        "'/ tight loop': median of the per-round ratios (range: min-max); '/ model' > 1: the loader keeps up with "
        "training on this machine; S3 rows: one epoch each, shards fetched into an empty cache"
    )
    return 0


def s3_rows(tmp: Path, cfg_path: Path, args, tight_sps: float, raw: dict[str, float]) -> list:
    """One epoch per loader over shards on a local moto S3 server (fetched into an empty cache), as table rows."""
    rows = []
    with local_s3() as endpoint:
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        remote = write_synthetic_shards("s3://bench/shards/", args.samples, 256, audio_seconds=0.5)
        bps, raw_sps, _ = raw_read(storage.expand(remote["urls"]))
        print(
            f"s3 (moto): raw sequential read {bps / 1e6:.1f} MB/s, webdataset tar iteration {raw_sps:.0f} samples/s"
        )
        for kind, workers in (("indexed", 1), ("indexed", 2), ("streaming", 2)):
            overrides = [
                f"data.train_urls={remote['urls']}",
                f"data.num_workers={workers}",
                f"data.loader={kind}",
                f"data.cache_dir={tmp / f'cache-s3-{kind}-{workers}'}",
                *NO_AUGMENTATION,
            ]
            rate = loader_epoch(build_train_loader(load_config(cfg_path, overrides), 0, 1, args.batch))
            name = f"s3 (moto) {kind} loader, {workers} worker(s)"
            raw[name] = raw_sps
            rows.append((name, [rate], [rate / tight_sps]))
    return rows


if __name__ == "__main__":
    sys.exit(main())
