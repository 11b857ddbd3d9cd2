"""``mmt shards build | stats | demo | index``: the data commands (thin wrappers over `mmt.data.build`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import tempfile

from mmt.cliargs import ArgumentParser
from mmt.data import storage
from mmt.data.build.builder import BuildOptions, build_shards
from mmt.data.build.demo import build_demo, build_demo_annotations
from mmt.data.build.inputs import InputError
from mmt.data.build.process import TASKS, ProcessOptions
from mmt.data.media import RESIZE_MODES
from mmt.data.schema import INDEX_SUFFIX
from mmt.data.stats import format_stats, shard_stats
from mmt.data.tarindex import scan_file


def parse_bytes(text: str) -> int:
    """``"1GB"``, ``"500MB"``, ``"64KiB"`` or a plain number of bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500MB, 1GB, 1048576)")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " kmgt".index(m.group(2) or " "))


def _build_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="build tar shards from a folder, CSV, or JSON / JSONL manifest")
    p.add_argument(
        "input", help="folder of files (KEY.jpg + KEY.txt ...), .csv/.tsv, .json or .jsonl manifest"
    )
    p.add_argument("out", help="output folder or fsspec URL (s3://bucket/prefix/)")
    p.add_argument("--task", choices=TASKS, default="auto", help="required fields are checked per task")
    p.add_argument(
        "--format", dest="input_format", default="auto", choices=("auto", "folder", "csv", "json", "jsonl")
    )
    p.add_argument("--root", help="base folder for relative media paths (default: the manifest's folder)")
    p.add_argument("--image-size", type=int, default=0, help="resize images (0: keep their size)")
    p.add_argument("--resize-mode", choices=RESIZE_MODES, default="keep_ratio")
    p.add_argument(
        "--reencode", action="store_true", help="re-encode every image (default: keep jpg/png/webp bytes)"
    )
    p.add_argument("--image-format", choices=("jpg", "png", "webp"), default="jpg")
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--min-image-size", type=int, default=1, help="reject images with a smaller side")
    p.add_argument("--audio-rate", type=int, default=0, help="resample audio to this rate (0: keep)")
    p.add_argument("--audio-format", choices=("keep", "wav", "flac"), default="keep")
    p.add_argument("--max-audio-seconds", type=float, default=0.0, help="cut longer clips (0: keep)")
    p.add_argument("--max-samples-per-shard", type=int, default=10000)
    p.add_argument("--max-shard-bytes", type=parse_bytes, default=parse_bytes("1GB"))
    p.add_argument("--workers", type=int, default=1, help="parallel processes decoding / resizing")
    p.add_argument("--prefix", default="shard", help="shards are named PREFIX-000000.tar, ...")
    p.add_argument("--endpoint-url", default="", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument("--max-answers", type=int, default=3129, help="VQA answer vocabulary size")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _matching(cls: type, args: argparse.Namespace) -> dict:
    """The flags named like fields of the dataclass ``cls`` (``--max-shard-bytes`` -> ``max_shard_bytes``)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def cmd_build(args: argparse.Namespace) -> int:
    process = ProcessOptions(**_matching(ProcessOptions, args))
    opts = BuildOptions(**_matching(BuildOptions, args), progress=not args.quiet, process=process)
    try:
        manifest = build_shards(opts)
    except InputError as e:
        print(f"mmt shards build: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {manifest['num_samples']} samples in {manifest['num_shards']} shards "
        f"({manifest['num_bytes']:,} bytes): {manifest['urls']}"
    )
    if manifest["failures"]:
        print(f"skipped {manifest['num_failures']} broken inputs:", file=sys.stderr)
        for f in manifest["failures"][:20]:
            print(f"  {f['input']} ({f['key']}): {f['error']}", file=sys.stderr)
        if manifest["num_failures"] > 20:
            print(f"  ... see {args.out.rstrip('/')}/manifest.json", file=sys.stderr)
    return 0


def _shard_urls(command: str, url: str) -> list[str]:
    """The shards ``url`` names (brace ranges, globs); none is one stderr line from the caller's command."""
    urls = storage.expand(url)
    if not urls:
        print(f"mmt shards {command}: {url!r} names no shard", file=sys.stderr)
    return urls


def cmd_stats(args: argparse.Namespace) -> int:
    urls = _shard_urls("stats", args.url)
    if not urls:
        return 2
    stats = shard_stats(urls, args.endpoint_url, args.max_samples)
    print(json.dumps(stats, indent=1) if args.json else format_stats(stats))
    if stats["errors"]:
        # The report above covers only what could be read: say so, naming the first culprit.
        more = f" (and {len(stats['errors']) - 1} more)" if len(stats["errors"]) > 1 else ""
        print(f"mmt shards stats: unreadable data: {stats['errors'][0]}{more}", file=sys.stderr)
        return 2
    if not stats["samples"]:
        print(f"mmt shards stats: no samples in {args.url}", file=sys.stderr)
        return 2
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if not 0.0 < args.val_fraction < 1.0:
        print(
            f"mmt shards demo: --val-fraction {args.val_fraction}: expected a fraction in (0, 1)",
            file=sys.stderr,
        )
        return 2
    if args.max_samples_per_shard < 1:
        print(
            f"mmt shards demo: --max-samples-per-shard {args.max_samples_per_shard}: expected >= 1",
            file=sys.stderr,
        )
        return 2
    if not storage.is_remote(args.out) and os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"mmt shards demo: {args.out}: exists and is not a folder", file=sys.stderr)
        return 2
    if args.annotations:
        if storage.is_remote(args.out):
            print(f"mmt shards demo: --annotations writes a local folder, not {args.out}", file=sys.stderr)
            return 2

        info = build_demo_annotations(args.out, val_fraction=args.val_fraction, seed=args.seed)
        print(f"demo annotations: {info['train_samples']} train + {info['val_samples']} val samples")
        print(
            f"  data.format=annotations data.train_urls={info['train_urls']} data.val_urls={info['val_urls']}"
        )
        return 0
    info = build_demo(
        args.out,
        val_fraction=args.val_fraction,
        max_samples_per_shard=args.max_samples_per_shard,
        seed=args.seed,
        endpoint_url=args.endpoint_url,
    )
    print(
        f"demo: {info['train_samples']} train + {info['val_samples']} val samples (image, text, audio, VQA)"
    )
    print(f"  data.train_urls={info['train_urls']}")
    print(f"  data.val_urls={info['val_urls']}")
    print(f"  data.answer_vocab={info['answer_vocab']}  (model.heads.vqa_answers={info['num_answers']})")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    """Write ``<shard>.idx.json`` sidecars for shards made by other tools (img2dataset, ShardWriter, tar)."""
    urls = _shard_urls("index", args.url)
    if not urls:
        return 2
    bad = 0
    for url in urls:
        with tempfile.TemporaryDirectory() as tmp:
            local = url
            try:
                if storage.is_remote(url):
                    local = os.path.join(tmp, "shard.tar")
                    storage.download(url, local, args.endpoint_url)
                index = scan_file(local, url)
            except OSError as e:
                print(f"mmt shards index: {url}: cannot read: {e.strerror or e}", file=sys.stderr)
                bad += 1
                continue
        if index.errors:
            # A sidecar would claim the shard is whole: write none and name the damage.
            print(f"mmt shards index: {index.errors[0]}; no index written", file=sys.stderr)
            bad += 1
            continue
        storage.write_bytes(index.to_json().encode(), url + INDEX_SUFFIX, args.endpoint_url)
        print(f"{url}: {len(index.samples)} samples")
    return 2 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="mmt shards", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _build_parser(sub)
    p = sub.add_parser("stats", help="counts, sizes, modality coverage and histograms of shards")
    p.add_argument("url", help="brace-expanded shard URLs")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--max-samples", type=int, default=0, help="stop after this many samples (0: all)")
    p.add_argument("--endpoint-url", default="")
    p = sub.add_parser("demo", help="build the embedded sklearn-digits tri-modal demo dataset (no download)")
    p.add_argument("out", help="output folder or fsspec URL")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--max-samples-per-shard", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--endpoint-url", default="")
    p.add_argument(
        "--annotations",
        action="store_true",
        help="write media files + train.jsonl / val.jsonl (the annotation layout) instead of shards",
    )
    p = sub.add_parser("index", help="write byte-offset index sidecars for existing shards")
    p.add_argument("url", help="brace-expanded shard URLs")
    p.add_argument("--endpoint-url", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return {"build": cmd_build, "stats": cmd_stats, "demo": cmd_demo, "index": cmd_index}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
