"""The checkpoint manager: saves in mmt's layout (`mmt.ckpt.layout`) through DeepSpeed's sharded ``save_checkpoint``,
and names the checkpoint a run resumes from (`resume_point`).

Layout under ``<run_dir>/checkpoints/``::

    step_00000100/            DeepSpeed's per-rank files (model states, ZeRO optimizer partitions)
        mmt_meta.json         written by rank 0 only after every rank finished: {..., "complete": true}
    latest                    the newest complete tag, replaced atomically after the meta file

A save that dies half-way leaves a tag folder without ``mmt_meta.json``: never picked for resume, and the
``latest`` pointer still names the previous complete checkpoint. DeepSpeed's own ``latest`` writer is off.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from mmt.ckpt.layout import (
    CHECKPOINTS_DIR,
    META_FILE,
    complete_tags,
    is_complete,
    resolve_tag_dir,
    step_of_tag,
    tag_for_step,
    write_latest,
    write_meta,
)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def resume_point(resume: str, run_dir: str | os.PathLike) -> Path | None:
    """The tag folder ``train.resume`` names, through `resolve_tag_dir` (finished saves only).

    ``""``: none. ``"auto"``: this run's checkpoint (``latest``, else the newest finished save), or None when the
    run has no finished save yet: a fresh start. Anything else: a tag, checkpoint or run folder; an error naming
    it when nothing finished is there.
    """
    if not resume:
        return None
    if resume == "auto":
        root = Path(run_dir) / CHECKPOINTS_DIR
        return resolve_tag_dir(root, complete=True) if complete_tags(root) else None
    return resolve_tag_dir(resume, complete=True)


class CheckpointManager:
    """Saves through the DeepSpeed engine, marks completion, moves ``latest``, prunes old checkpoints."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int, rank: int) -> None:
        self.root = Path(run_dir) / CHECKPOINTS_DIR
        self.keep_last = keep_last
        self.rank = rank

    def save(self, engine: Any, step: int, client_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Collective: every rank must call it. Returns the tag folder."""
        tag = tag_for_step(step)
        tag_dir = self.root / tag
        already = is_complete(tag_dir)
        _barrier()
        if already:
            # Same step saved before (e.g. preempted right after a resume): that state is this state.
            return tag_dir
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            (tag_dir / META_FILE).unlink(missing_ok=True)
        _barrier()
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        _barrier()  # every rank's shard is on disk before the checkpoint is declared complete
        if self.rank == 0:
            write_meta(tag_dir, {**meta, "tag": tag, "complete": True})
            write_latest(self.root, tag)
            self._prune(keep=tag)
        _barrier()
        return tag_dir

    def _prune(self, keep: str) -> None:
        if self.keep_last <= 0:
            return
        tags = complete_tags(self.root)
        doomed = [t for _, t in tags[: -self.keep_last] if t != keep]
        newest = tags[-1][0] if tags else -1
        # Interrupted saves older than the newest complete one can never be resumed from.
        for d in self.root.iterdir():
            s = step_of_tag(d.name)
            if s is not None and d.is_dir() and s < newest and not is_complete(d):
                doomed.append(d.name)
        for t in doomed:
            shutil.rmtree(self.root / t, ignore_errors=True)
