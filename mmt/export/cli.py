"""``mmt export WEIGHTS_OR_RUN OUT --format onnx|torchscript|exported-program [--towers ...] [--quantize int8]``."""

from __future__ import annotations

import argparse
import json
import sys

from mmt.ckpt.layout import CheckpointError
from mmt.config import ConfigError
from mmt.export.exporter import ExportError, export_model


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mmt export", description=__doc__)
    p.add_argument("source", help="an `mmt ckpt convert` folder, or a training run / checkpoint folder")
    p.add_argument(
        "out", help="output folder (one file per tower + export.json, preprocess.json, config.yaml)"
    )
    p.add_argument("--format", default="onnx", choices=("onnx", "torchscript", "exported-program"))
    p.add_argument("--towers", default="", help="comma-separated towers (default: every tower of the model)")
    p.add_argument(
        "--quantize", default="", choices=("", "int8"), help="int8: dynamic quantization of linears"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = p.parse_args(argv)

    towers = [t.strip() for t in args.towers.split(",") if t.strip()] or None
    try:
        meta = export_model(
            args.source,
            args.out,
            fmt=args.format,
            towers=towers,
            quantize=args.quantize,
            overwrite=args.overwrite,
        )
    except (ExportError, CheckpointError, ConfigError) as e:
        print(f"mmt export: {e}", file=sys.stderr)
        return 2
    for m, t in meta["towers"].items():
        print(
            f"{m:>5}: {args.out}/{t['file']}  {t['bytes'] / 1e6:.2f} MB  max |diff| vs eager {t['max_abs_diff_vs_eager']:.2e}"
        )
    print(json.dumps({"format": meta["format"], "quantize": meta["quantize"]}))
    return 0
