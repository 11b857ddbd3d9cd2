"""Resume on any world size: pick how the checkpoint loads, converting it to a universal checkpoint when needed.

DeepSpeed loads its ZeRO-1/2/3 files only on the world size that saved them (a full load raises, and loading only
the module under ZeRO-3 silently gives wrong weights). When the world size changed, rank 0 converts the checkpoint
with `mmt.ckpt.universal.to_universal` (DeepSpeed's own converter) into ``<run_dir>/.resume-universal/``, every
rank waits for it, and the run loads that copy with ``"checkpoint": {"load_universal": true}``. The copy is
deleted once every rank has loaded it: the next save is in the new world size's own layout.

Every rank waits in a collective while rank 0 converts: ``train.dist_timeout_s`` must cover the conversion of
a large model (it reads and writes every fp32 weight and both Adam moments once).
"""

from __future__ import annotations

import shutil
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from mmt.ckpt.layout import CheckpointError, read_meta
from mmt.ckpt.resume import ResumePlan, check_resumable
from mmt.ckpt.universal import to_universal
from mmt.training import distributed as D

CONVERTED_DIR = ".resume-universal"


def needs_universal(tag_dir: Path, world_size: int, zero_stage: int) -> bool:
    """True when ``tag_dir`` is a DeepSpeed ZeRO-1/2/3 checkpoint that would load only as a universal one here.

    That is: saved on another world size (or ZeRO-1 <-> ZeRO-2), into a stage its universal form loads into
    (ZeRO-3 into ZeRO-3, ZeRO-1/2 into ZeRO-1/2). Everything else is left to `check_resumable` (loads as
    saved, or a refusal naming the file).
    """
    meta = read_meta(tag_dir)
    if meta.get("universal") or (tag_dir / "zero").is_dir():
        return False
    saved_ws, saved_stage = int(meta.get("world_size", -1)), int(meta.get("zero_stage", -1))
    if saved_stage < 1 or zero_stage < 1 or (saved_stage == 3) != (zero_stage == 3):
        return False
    return saved_ws != world_size or saved_stage != zero_stage


def plan_resume(
    tag_dir: Path, world_size: int, rank: int, zero_stage: int, config: dict[str, Any], run_dir: Path
) -> ResumePlan:
    """Collective: the `ResumePlan` for ``tag_dir`` on this run, after rank 0 converted it if it had to.

    A failure on rank 0 (conversion, a refused checkpoint) is raised on every rank with the same message, so no
    rank is left waiting in a collective.
    """
    error, converted, seconds = None, None, 0.0
    if rank == 0:
        try:
            if needs_universal(tag_dir, world_size, zero_stage):
                # Checked as it was saved first: an incomplete checkpoint or another model fails before the work.
                meta = read_meta(tag_dir)
                check_resumable(tag_dir, int(meta["world_size"]), int(meta["zero_stage"]), config=config)
                t0 = time.perf_counter()
                out = run_dir / CONVERTED_DIR / tag_dir.name
                converted = str(to_universal(tag_dir, out, overwrite=True).tag_dir)
                seconds = time.perf_counter() - t0
        except CheckpointError as e:
            error = str(e)
    error, converted, seconds = D.broadcast_object((error, converted, seconds))
    if error is not None:
        raise CheckpointError(error)
    plan = check_resumable(Path(converted) if converted else tag_dir, world_size, zero_stage, config=config)
    if converted:
        plan.converted_from = tag_dir
        plan.convert_seconds = seconds
    return plan


def drop_converted(plan: ResumePlan, rank: int) -> None:
    """Collective, after every rank loaded ``plan``: delete the universal copy `plan_resume` made, if any."""
    if plan.converted_from is None:
        return
    D.barrier()
    if rank == 0:
        shutil.rmtree(plan.load_dir.parent, ignore_errors=True)
        with suppress(OSError):
            plan.load_dir.parent.parent.rmdir()  # the .resume-universal folder, when nothing else is in it
