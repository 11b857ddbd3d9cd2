"""`mmt model CONFIG [key=value ...]`: build a model from a config and print its size and training FLOPs."""

from __future__ import annotations

import json
import sys

import torch

from mmt.cliargs import ArgumentParser
from mmt.config import ConfigError
from mmt.model.factory import create_model


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="mmt model", description=__doc__)
    parser.add_argument(
        "config",
        help="a shipped model name (tiny_tri, base_tri, ...), a model YAML/JSON file or a run config",
    )
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the model section")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)

    try:
        with torch.device("meta"):  # sizes only: no memory for the weights
            model = create_model(args.config, args.overrides)
    except ConfigError as e:
        print(f"mmt model: config error: {e}", file=sys.stderr)
        return 2
    report = {
        "name": model.cfg.name,
        "modalities": model.modalities,
        "parameters": model.parameter_counts(),
        "tokens_per_sample": model.tokens_per_sample(),
        "train_flops_per_sample": model.flops_per_sample(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['name']}: {', '.join(report['modalities'])}")
    for part, n in report["parameters"].items():
        print(f"  params {part:<12} {n / 1e6:10.2f} M")
    for part, f in report["train_flops_per_sample"].items():
        print(f"  train FLOPs/sample {part:<8} {f / 1e9:10.3f} G")
    return 0
