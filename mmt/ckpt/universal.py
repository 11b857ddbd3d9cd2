"""`mmt ckpt to-universal` (alias `reshard`): a ZeRO checkpoint saved on N ranks -> one that resumes on any M.

DeepSpeed's universal checkpoint stores every parameter's fp32 value and Adam moments unpartitioned
(``<tag>/zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt``); a run started with ``"checkpoint": {"load_universal":
true}`` re-partitions them for its own world size. We run DeepSpeed's own converter
(``deepspeed.checkpoint.ds_to_universal``, through `mmt.ckpt.ds_universal_entry` which fixes scalar parameters;
ZeRO-1/2 checkpoints need ``--inject_missing_state``) in a subprocess,
then lay the result out as an mmt run folder: ``OUT/checkpoints/<tag>/`` with ``mmt_meta.json`` (``universal:
true``, ``source_world_size``), ``latest`` and ``latest_universal``, and the run's ``config.yaml`` when there is
one. The folder is built under a temporary name and renamed into place when complete.

Carried over: weights (fp32 masters), Adam moments and step counts, optimizer hyper-parameters, the LR scheduler,
DeepSpeed's global step and sample counters, and the client state (step, samples_seen, the world-size-independent
data-loader state (epoch, samples_consumed), per-rank RNG states, MLflow run id). Not carried over: per-rank RNG
streams for ranks the saved run did not have (`mmt.ckpt.resume.rank_rng_state` returns None for them; seed them
afresh), and bit-identical continuation when the global batch size changes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mmt.ckpt.convert import publish_dir
from mmt.ckpt.layout import (
    CHECKPOINTS_DIR,
    LATEST_UNIVERSAL_FILE,
    CheckpointError,
    write_latest,
    write_meta,
)
from mmt.ckpt.reader import ZeroCheckpoint
from mmt.ckpt.torchio import TRUST_FLAG, check_files, trusted


@dataclass
class UniversalResult:
    run_dir: Path
    tag_dir: Path
    tag: str
    step: int | None
    source_world_size: int


def to_universal(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tag: str | None = None,
    overwrite: bool = False,
    workers: int = 2,
) -> UniversalResult:
    """Convert the checkpoint at ``path`` (run dir, ``checkpoints/`` or tag folder) into the run folder ``out``."""
    ck = ZeroCheckpoint(path, tag)  # validates: complete, every rank's file present and consistent
    check_files(sorted(ck.dir.glob("*.pt")))  # DeepSpeed's converter unpickles every one: vet them first
    out = Path(out)
    if ck.stage == 0:
        raise CheckpointError(
            f"{ck.model_file}: a ZeRO-0 checkpoint holds the full model and optimizer state in one file; "
            "it resumes on any world size as it is"
        )
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: already exists (pass --overwrite to replace it)")
    meta = (
        dict(ck.meta)
        if ck.meta is not None
        else {  # another program's DeepSpeed checkpoint: record what its own files say
            "step": ck.step,
            "world_size": ck.world_size,
            "zero_stage": ck.stage,
            "dtype": ck.dtype,
            "config": None,
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tag_dir = tmp / CHECKPOINTS_DIR / ck.tag
    tag_dir.parent.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "mmt.ckpt.ds_universal_entry",
        "--input_folder",
        str(ck.dir),
        "--output_folder",
        str(tag_dir),
        "--num_extract_workers",
        str(workers),
        "--num_merge_workers",
        str(max(1, workers // 2)),
    ]
    if ck.stage in (1, 2):
        cmd.append("--inject_missing_state")
    if trusted():
        cmd.append(TRUST_FLAG)
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise CheckpointError(
                f"{ck.dir}: DeepSpeed's universal conversion failed (exit {proc.returncode}):\n{tail}"
            )
        if not (tag_dir / "zero" / "optimizer_state.pt").is_file():
            raise CheckpointError(
                f"{tag_dir}: DeepSpeed's universal conversion wrote no zero/optimizer_state.pt"
            )
        write_meta(
            tag_dir,
            {
                **meta,
                "universal": True,
                "source": str(ck.dir),
                "source_world_size": ck.world_size,
                "source_zero_stage": ck.stage,
                "complete": True,
            },
        )
        write_latest(tag_dir.parent, ck.tag)
        write_latest(tag_dir.parent, ck.tag, LATEST_UNIVERSAL_FILE)
        src_cfg = ck.root.parent / "config.yaml"
        if ck.root.name == CHECKPOINTS_DIR and src_cfg.is_file():
            shutil.copy2(src_cfg, tmp / "config.yaml")
        publish_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return UniversalResult(out, out / CHECKPOINTS_DIR / ck.tag, ck.tag, ck.step, ck.world_size)
