"""The checkpoint manager: saves in mmt's layout (`mmt.ckpt.layout`) through DeepSpeed's sharded ``save_checkpoint``,
and finds the checkpoint a run resumes from.

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
    CheckpointError,
    complete_meta,
    step_of_tag,
    tag_for_step,
    write_latest,
    write_meta,
)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def complete_tags(root: str | os.PathLike) -> list[tuple[int, str]]:
    """(step, tag) of every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        step = step_of_tag(d.name)
        if step is not None and d.is_dir() and complete_meta(d) is not None:
            out.append((step, d.name))
    return sorted(out)


def find_checkpoint(spec: str, run_dir: str | os.PathLike) -> Path | None:
    """The tag folder to resume from.

    ``spec`` ``"auto"``: the newest complete checkpoint of ``run_dir`` (None if there is none: a fresh start).
    Otherwise a path: a tag folder, a ``checkpoints/`` folder or a run folder; an error if nothing complete is
    there.
    """
    if not spec:
        return None
    if spec == "auto":
        tags = complete_tags(Path(run_dir) / CHECKPOINTS_DIR)
        return Path(run_dir) / CHECKPOINTS_DIR / tags[-1][1] if tags else None
    p = Path(spec)
    if not p.exists():
        raise CheckpointError(f"{spec}: no such checkpoint file or directory")
    if (p / META_FILE).exists():
        if complete_meta(p) is None:
            raise CheckpointError(f"{p / META_FILE}: checkpoint is not complete (its save did not finish)")
        return p
    root = p / CHECKPOINTS_DIR if (p / CHECKPOINTS_DIR).is_dir() else p
    tags = complete_tags(root)
    if not tags:
        raise CheckpointError(
            f"{spec}: no complete checkpoint (step_*/{META_FILE} with complete: true) under {root}"
        )
    return root / tags[-1][1]


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
        already = complete_meta(tag_dir) is not None
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
            if s is not None and d.is_dir() and s < newest and complete_meta(d) is None:
                doomed.append(d.name)
        for t in doomed:
            shutil.rmtree(self.root / t, ignore_errors=True)
