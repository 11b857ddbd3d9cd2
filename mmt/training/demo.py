"""``mmt demo``: the README's main command, end to end on a laptop CPU in a few minutes.

1. builds the tri-modal digits dataset (``mmt shards demo data/demo``) unless it is already there;
2. trains the tiny text + image + audio model (configs/train/demo.yaml: contrastive retrieval, ZeRO-2, fp32)
   with 2 processes under the ``deepspeed`` launcher on CPU, logging to the embedded MLflow store
   (``sqlite:///<cwd>/mlflow.db``) and checkpointing under ``runs/``;
3. evaluates on the held-out split and prints recall@1 next to its chance level, and where the MLflow run and
   the checkpoint are.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

from mmt.cliargs import ArgumentParser
from mmt.config import ConfigError, load_config
from mmt.config.named import CONFIG_DIR
from mmt.data.build.demo import build_demo
from mmt.data.build.demo_baseline import nearest_centroid_accuracy
from mmt.training.distributed import free_port

DEMO_CONFIG = CONFIG_DIR / "train" / "demo.yaml"  # package data: found from a wheel install too


class DemoError(ValueError):
    """Bad demo input, reported as one line before anything is built or launched."""


def _ensure_data(data_dir: Path) -> dict:
    if data_dir.exists() and not data_dir.is_dir():
        raise DemoError(f"--data {data_dir}: exists and is not a folder")
    info_path = data_dir / "demo.json"
    if not info_path.is_file():
        print(
            f"mmt demo: building the demo dataset in {data_dir} (scikit-learn digits + synthesized audio)",
            flush=True,
        )
        build_demo(str(data_dir))
    try:
        info = json.loads(info_path.read_text())
        if not isinstance(info, dict):
            raise TypeError(f"expected an object, got {type(info).__name__}")
        for key in ("train_urls", "val_urls"):
            if not isinstance(info.get(key), str):
                raise KeyError(f"no {key!r}")
    except (ValueError, TypeError, KeyError) as e:
        raise DemoError(
            f"{info_path}: not a demo dataset description ({e}); remove {data_dir} to rebuild it"
        ) from e
    return info


def _data_wait_line(metrics_path: Path) -> str | None:
    """The mean of the logged ``train/data_wait_frac``: whether the run's steps waited for their loader."""
    fracs = []
    with suppress(OSError):
        for line in metrics_path.read_text().splitlines():
            with suppress(ValueError):
                v = json.loads(line).get("train/data_wait_frac")
                if isinstance(v, (int, float)):
                    fracs.append(float(v))
    if not fracs:
        return None
    return (
        f"  data wait: {100 * sum(fracs) / len(fracs):.1f} % of step time on average over {len(fracs)} log "
        "lines (train/data_wait_frac: time blocked on the loader)"
    )


def _launch_command(launcher: str, nproc: int, config: Path, overrides: list[str]) -> list[str]:
    bindir = Path(sys.executable).parent
    if launcher == "deepspeed":
        exe = shutil.which("deepspeed", path=str(bindir)) or shutil.which("deepspeed")
        if exe is None:
            raise SystemExit("mmt demo: the deepspeed launcher is not on PATH (is DeepSpeed installed?)")
        return [
            exe,
            "--num_gpus",
            str(nproc),
            "--master_port",
            str(_free_port()),
            "--module",
            "mmt.train",
            str(config),
            *overrides,
        ]
    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(_free_port()),
            "-m",
            "mmt.train",
            str(config),
            *overrides,
        ]
    return [sys.executable, "-m", "mmt.train", str(config), *overrides]


def _free_port() -> int:
    return free_port()


def _zero_shot_lines(ev: dict, info: dict) -> list[str]:
    """Zero-shot digit accuracy per modality beside the raw-feature nearest-centroid baseline."""
    if not any(k.startswith("val/zero_shot_") for k in ev):
        return []

    base = nearest_centroid_accuracy(info)
    lines = ["  zero-shot digit classification (10 classes, chance 0.100; baseline: nearest class centroid)"]
    for m, raw in (("image", "raw pixels"), ("audio", "raw spectra")):
        if f"val/zero_shot_{m}_top1" in ev:
            lines.append(
                f"  {m:>5}: top-1 {ev[f'val/zero_shot_{m}_top1']:.3f}  top-5 {ev[f'val/zero_shot_{m}_top5']:.3f}"
                f"   baseline on {raw} {base[m]:.3f}"
            )
    return lines


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="mmt demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/demo", help="demo dataset folder (built when missing)")
    p.add_argument("--run-dir", default="", help="run folder (default: runs/demo-<date>-<time>)")
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks)")
    p.add_argument(
        "--launcher",
        choices=("deepspeed", "torchrun", "none"),
        default="deepspeed",
        help="none: a single process without a launcher",
    )
    p.add_argument("--config", default=str(DEMO_CONFIG), help="run config (file or shipped name)")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides, e.g. train.max_steps=50")
    return p


def _training_overrides(args: argparse.Namespace, run_dir: Path) -> tuple[list[str], dict]:
    """The launch's ``key=value`` list and the dataset's description; the config and every override are checked
    here, and the dataset built, before any rank is launched (a `DemoError` or `ConfigError` otherwise)."""
    run_overrides = [f"train.run_dir={run_dir}", f"tracking.run_name={run_dir.name}", *args.overrides]
    load_config(args.config, run_overrides)
    info = _ensure_data(Path(args.data).resolve())
    data = [f"data.train_urls={info['train_urls']}", f"data.val_urls={info['val_urls']}"]
    return [*data, *run_overrides], info


def _launch(launcher: str, nproc: int, config: Path, overrides: list[str]) -> int:
    cmd = _launch_command(launcher, nproc, config, overrides)
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env.setdefault("OMP_NUM_THREADS", "1")
    print(f"mmt demo: training with {nproc} process(es) via {launcher}: {' '.join(cmd)}", flush=True)
    return subprocess.call(cmd, env=env)


def _retrieval_lines(ev: dict) -> list[str]:
    """Held-out recall@1 per direction beside its chance level, and the mean image<->text recall@1."""
    lines = [
        "mmt demo: held-out retrieval on "
        f"{int(ev.get('val/samples', 0))} unseen digits (recall@1, chance level in brackets)",
    ]
    for q, g, pair in (
        ("image", "text", "text_image"),
        ("text", "image", "text_image"),
        ("audio", "text", "text_audio"),
        ("text", "audio", "text_audio"),
    ):
        key = f"val/{q}_to_{g}_recall_at_1"
        if key in ev:
            chance = ev.get(f"val/{pair}_recall_at_1_chance", float("nan"))
            r5 = ev.get(f"val/{q}_to_{g}_recall_at_5", float("nan"))
            lines.append(
                f"  {q:>5} -> {g:<5}  recall@1 {ev[key]:.3f}  (chance {chance:.3f})   recall@5 {r5:.3f}"
            )
    if "val/recall_at_1" in ev:
        lines.append(f"  mean image<->text recall@1: {ev['val/recall_at_1']:.3f}")
    return lines


def _summary(final: dict, info: dict, run_dir: Path, total_s: float, train_s: float) -> str:
    """The closing block: evaluation, zero-shot accuracy, final loss, data wait, where the run and checkpoint are."""
    ev = final.get("eval", {})
    lines = ["", "=" * 78, *_retrieval_lines(ev)]
    lines += _zero_shot_lines(ev, info)
    train = final.get("train", {})
    if "train/loss" in train:
        lines.append(
            f"  final training loss {train['train/loss']:.3f} after {final['step']} steps "
            f"({final['samples_seen']} samples)"
        )
    lines.append(_data_wait_line(run_dir / "metrics.jsonl"))
    uri = final.get("tracking_uri")
    lines += [
        f"  MLflow run: {final.get('mlflow_run_id')} in {uri}",
        f"    browse: mlflow ui --backend-store-uri {uri}" if uri else "",
        f"  checkpoint: {final.get('checkpoint')}",
        f"  run folder: {run_dir}",
        f"  time: {total_s:.0f} s in total, {train_s:.0f} s in the training launch",
        "=" * 78,
    ]
    return "\n".join(x for x in lines if x is not None)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    t0 = time.time()
    if args.nproc < 1:
        print(f"mmt demo: --nproc {args.nproc}: expected >= 1", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.run_dir or f"runs/demo-{stamp}").resolve()
    try:
        overrides, info = _training_overrides(args, run_dir)
    except ConfigError as e:
        print(f"mmt demo: config error: {e}", file=sys.stderr)
        return 2
    except DemoError as e:
        print(f"mmt demo: {e}", file=sys.stderr)
        return 2
    nproc = 1 if args.launcher == "none" else args.nproc
    t_train = time.time()
    rc = _launch(args.launcher, nproc, Path(args.config), overrides)
    train_s = time.time() - t_train
    final_path = run_dir / "final_metrics.json"
    if rc != 0 or not final_path.is_file():
        print(f"mmt demo: training failed (exit code {rc}); see the output above", file=sys.stderr)
        return rc or 1
    final = json.loads(final_path.read_text())
    print(_summary(final, info, run_dir, time.time() - t0, train_s), flush=True)
    return 0
