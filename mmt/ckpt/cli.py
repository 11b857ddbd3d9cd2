"""`mmt ckpt`: inspect, convert (-> safetensors) and reshard (-> universal, any world size) checkpoints."""

from __future__ import annotations

import argparse
import json
import sys

from mmt.ckpt.convert import convert_checkpoint
from mmt.ckpt.inspect import format_summary, inspect_checkpoint
from mmt.ckpt.layout import CheckpointError
from mmt.ckpt.resume import check_resumable
from mmt.ckpt.torchio import checkpoint_loading
from mmt.ckpt.universal import to_universal
from mmt.cliargs import ArgumentParser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mmt ckpt", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser(
        "inspect", help="tags, step, ZeRO stage, world size, dtype, size, config, completeness"
    )
    s.add_argument("dir", help="run dir, its checkpoints/ folder, or one tag folder")
    s.add_argument("--tag", help="tag to describe (default: the one in 'latest')")
    s.add_argument("--json", action="store_true", help="print JSON")

    s = sub.add_parser("convert", help="ZeRO 0-3 shards -> consolidated safetensors + model config")
    s.add_argument("dir", help="run dir, its checkpoints/ folder, or one tag folder")
    s.add_argument("out", help="output folder (created; must not exist unless --overwrite)")
    s.add_argument("--tag", help="tag to convert (default: the one in 'latest')")
    s.add_argument(
        "--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="output dtype of float tensors"
    )
    s.add_argument(
        "--max-shard-size",
        default=None,
        help="split into shards of at most this size (e.g. 5GB, 500MB) with model.safetensors.index.json",
    )
    s.add_argument(
        "--only",
        default=None,
        help="comma-separated towers (text,image,audio) or name prefixes to export on their own",
    )
    s.add_argument(
        "--config", default=None, help="refuse unless the checkpoint was trained with this model config"
    )
    s.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")

    for name, help_ in (
        ("to-universal", "ZeRO checkpoint -> DeepSpeed universal checkpoint (resume on any world size)"),
        ("reshard", "alias of to-universal"),
    ):
        s = sub.add_parser(name, help=help_)
        s.add_argument("dir", help="run dir, its checkpoints/ folder, or one tag folder")
        s.add_argument("out", help="output run folder; the checkpoint goes to OUT/checkpoints/<tag>/")
        s.add_argument("--tag", help="tag to convert (default: the one in 'latest')")
        s.add_argument("--overwrite", action="store_true", help="replace an existing output tag folder")
        s.add_argument("--workers", type=int, default=2, help="DeepSpeed extraction worker processes")

    s = sub.add_parser("check-resume", help="can this checkpoint resume on WORLD_SIZE ranks at ZeRO stage N?")
    s.add_argument("dir")
    s.add_argument("--world-size", type=_positive_int, required=True, help="ranks of the resuming run")
    s.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), required=True)
    s.add_argument("--tag")

    for s in sub.choices.values():
        s.add_argument(
            "--trust-checkpoint",
            action="store_true",
            help="unpickle the files fully: may run code stored in them (only for checkpoints whose maker you "
            "trust); default: tensors and the classes DeepSpeed checkpoints hold, anything else refused",
        )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    try:
        with checkpoint_loading(args.trust_checkpoint):
            return _run(args)
    except (CheckpointError, ValueError) as e:
        print(f"mmt ckpt {args.cmd}: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "inspect":
        info = inspect_checkpoint(args.dir, args.tag)
        print(json.dumps(info, indent=2, default=str) if args.json else format_summary(info))
        return 0 if info.get("complete") else 1
    if args.cmd == "convert":
        only = [x.strip() for x in args.only.split(",") if x.strip()] if args.only else None
        res = convert_checkpoint(
            args.dir,
            args.out,
            tag=args.tag,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            only=only,
            config=args.config,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
        print(
            f"wrote {res.num_tensors} tensors ({res.total_bytes:,} bytes, step {res.step}) to {res.out_dir}: "
            + ", ".join(res.files)
        )
        return 0
    if args.cmd in ("to-universal", "reshard"):
        res = to_universal(args.dir, args.out, tag=args.tag, overwrite=args.overwrite, workers=args.workers)
        print(
            f"universal checkpoint of step {res.step} (saved on {res.source_world_size} ranks) at {res.tag_dir}; "
            f"resume from {res.run_dir} on any world size"
        )
        return 0
    if args.cmd == "check-resume":
        plan = check_resumable(args.dir, world_size=args.world_size, zero_stage=args.zero_stage, tag=args.tag)
        print(plan.describe())
        return 0
    return 2
