"""``mmt shards build``: inputs -> processed samples (parallel, order kept) -> deterministic shards + manifest.

The manifest (``manifest.json`` beside the shards) lists every shard with its sample count, bytes and sha256,
the failures (input, key, reason), modality counts and the options used; VQA builds also write the answer
vocabulary (``answers.json``: answers by frequency) that the loader's soft targets are scored against.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

from tqdm import tqdm

from mmt.data import storage
from mmt.data.build.inputs import InputError, InputRecord, read_inputs
from mmt.data.build.process import Processed, ProcessOptions, process_record
from mmt.data.build.writer import ShardInfo, ShardSink
from mmt.data.schema import ANSWERS_NAME, MANIFEST_NAME

MANIFEST_FORMAT = "mmt-shards/1"


@dataclass
class BuildOptions:
    input: str
    out: str
    input_format: str = "auto"
    root: str | None = None
    prefix: str = "shard"
    max_samples_per_shard: int = 10000
    max_shard_bytes: int = 1 << 30
    workers: int = 1
    endpoint_url: str = ""
    max_answers: int = 3129
    progress: bool = True
    process: ProcessOptions = field(default_factory=ProcessOptions)


def unsafe_key(key: str) -> bool:
    """A sample key that names a path outside the shard's own namespace (absolute, or with a '..' part)."""
    k = key.replace("\\", "/")
    return k.startswith("/") or ".." in k.split("/")


def shard_pattern(out: str, prefix: str, n: int) -> str:
    """The brace pattern naming all ``n`` shards (what ``data.train_urls`` takes)."""
    if n == 1:
        return storage.join(out, f"{prefix}-000000.tar")
    return storage.join(out, f"{prefix}-{{000000..{n - 1:06d}}}.tar")


def answer_vocabulary(counts: Counter, max_answers: int) -> list[str]:
    """Most frequent answers first, ties alphabetical: a stable vocabulary for the same data."""
    return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max_answers]]


def _processed(records: list[InputRecord], opts: BuildOptions) -> Iterator[Processed]:
    fn = partial(process_record, opts=opts.process)
    if opts.workers <= 1:
        yield from map(fn, records)
        return
    ctx = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=opts.workers, mp_context=ctx) as pool:
        yield from pool.map(fn, records, chunksize=max(1, min(64, len(records) // (opts.workers * 8) or 1)))


def write_samples(
    results: Iterable[Processed],
    out: str,
    *,
    prefix: str = "shard",
    max_samples_per_shard: int = 10000,
    max_shard_bytes: int = 1 << 30,
    endpoint_url: str = "",
    total: int | None = None,
    progress: bool = False,
    max_answers: int = 3129,
    options: dict[str, Any] | None = None,
    task: str = "auto",
    vocab: list[str] | None = None,
) -> dict[str, Any]:
    """Write processed samples in order, then the answer vocabulary and the manifest; returns the manifest.

    ``vocab`` fixes the answer vocabulary (e.g. to share one between splits); by default it is built from the
    answers seen, most frequent first.
    """
    failures: list[dict[str, str]] = []
    modalities: Counter = Counter()
    answers: Counter = Counter()
    if not prefix or "/" in prefix or "\\" in prefix or ".." in prefix:
        raise InputError(f"--prefix {prefix!r}: a shard name, not a path (shards go only into {out})")
    sink = ShardSink(out, prefix, max_samples_per_shard, max_shard_bytes, endpoint_url)
    bar = tqdm(total=total, desc="building shards", unit="sample", disable=not progress, file=sys.stderr)
    with sink:
        for res in results:
            bar.update(1)
            if res.sample is None:
                failures.append({"input": res.source, "key": res.key, "error": res.error or "unknown error"})
                continue
            if unsafe_key(res.key):  # would make a member every reader refuses (mmt.data.tarsafety)
                failures.append(
                    {"input": res.source, "key": res.key, "error": "key is an absolute or '..' path"}
                )
                continue
            sink.write(res.sample)
            modalities.update(res.modalities)
            answers.update(res.answers)
    bar.close()
    shards: list[ShardInfo] = sink.shards
    vocab_name = None
    if answers or vocab:
        vocab = vocab if vocab is not None else answer_vocabulary(answers, max_answers)
        payload = {"answers": vocab, "counts": [answers[a] for a in vocab]}
        storage.write_bytes(
            json.dumps(payload, indent=1).encode(), storage.join(out, ANSWERS_NAME), endpoint_url
        )
        vocab_name = ANSWERS_NAME
    manifest = {
        "format": MANIFEST_FORMAT,
        "task": task,
        "urls": shard_pattern(out, prefix, len(shards)) if shards else "",
        "num_shards": len(shards),
        "num_samples": sum(s.samples for s in shards),
        "num_bytes": sum(s.bytes for s in shards),
        "num_failures": len(failures),
        "modalities": dict(sorted(modalities.items())),
        "answer_vocab": vocab_name,
        "shards": [{k: v for k, v in asdict(s).items() if k != "url"} for s in shards],
        "failures": failures,
        "options": options or {},
    }
    storage.write_bytes(
        json.dumps(manifest, indent=1, sort_keys=False).encode(),
        storage.join(out, MANIFEST_NAME),
        endpoint_url,
    )
    return manifest


def build_shards(opts: BuildOptions) -> dict[str, Any]:
    """Build shards for ``opts``; broken inputs are skipped and listed in the returned manifest."""
    records = read_inputs(opts.input, opts.input_format, opts.root)
    options = {k: v for k, v in asdict(opts).items() if k not in ("progress", "process", "endpoint_url")}
    options.update(asdict(opts.process))
    return write_samples(
        _processed(records, opts),
        opts.out,
        prefix=opts.prefix,
        max_samples_per_shard=opts.max_samples_per_shard,
        max_shard_bytes=opts.max_shard_bytes,
        endpoint_url=opts.endpoint_url,
        total=len(records),
        progress=opts.progress,
        max_answers=opts.max_answers,
        options=options,
        task=opts.process.task,
    )
