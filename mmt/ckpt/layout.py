"""mmt's checkpoint layout on disk, in one place, so the trainer, the tools and the tests agree.

``<run_dir>/checkpoints/`` holds one folder per save, named by its tag ``step_XXXXXXXX``, with DeepSpeed's own
per-rank files inside, plus ``mmt_meta.json`` (written by rank 0 once every rank has finished) and, next to the
tag folders, the ``latest`` file naming the newest complete tag. A tag folder without ``mmt_meta.json`` (or with
``complete: false``) is an interrupted save and is never picked up.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from mmt.atomic import atomic_write_text

META_FILE = "mmt_meta.json"
LATEST_FILE = "latest"
LATEST_UNIVERSAL_FILE = "latest_universal"
CHECKPOINTS_DIR = "checkpoints"
TAG_RE = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, inconsistent or cannot be used as asked; the message names the file."""


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def step_of_tag(tag: str) -> int | None:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def write_meta(tag_dir: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write ``mmt_meta.json`` into a tag folder atomically; call on rank 0 after every rank has saved."""
    return atomic_write_text(
        Path(tag_dir) / META_FILE, json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n"
    )


def write_latest(ckpt_root: str | os.PathLike, tag: str, name: str = LATEST_FILE) -> Path:
    return atomic_write_text(Path(ckpt_root) / name, tag + "\n")


def read_meta(tag_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(tag_dir) / META_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing; the save of this checkpoint did not finish (mmt_meta.json is written last)"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return meta


def complete_meta(tag_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The meta of a complete checkpoint, else None (no or unreadable meta, or not marked complete): how the
    trainer and `mmt eval` pick checkpoints, skipping interrupted saves. `read_meta` is the strict reader."""
    try:
        meta = read_meta(tag_dir)
    except (CheckpointError, OSError):
        return None
    return meta if meta.get("complete") is True else None


def read_latest(ckpt_root: str | os.PathLike, name: str = LATEST_FILE) -> str | None:
    path = Path(ckpt_root) / name
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def is_tag_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / META_FILE).is_file() or any(p.glob("*_model_states.pt"))


def resolve_checkpoint_root(path: str | os.PathLike) -> Path:
    """Accept a run dir, its ``checkpoints/`` folder or a tag folder; return the folder holding the tag folders."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such checkpoint directory")
    if is_tag_dir(p):
        return p.parent
    if (p / CHECKPOINTS_DIR).is_dir():
        return p / CHECKPOINTS_DIR
    return p


def list_tags(ckpt_root: str | os.PathLike) -> list[str]:
    """Tag folders under a checkpoint root, oldest step first (folders not named ``step_*`` come last, by name)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    tags = [
        d.name for d in root.iterdir() if d.is_dir() and (step_of_tag(d.name) is not None or is_tag_dir(d))
    ]
    return sorted(tags, key=lambda t: (step_of_tag(t) is None, step_of_tag(t) or 0, t))


def resolve_tag_dir(path: str | os.PathLike, tag: str | None = None) -> tuple[Path, str]:
    """The tag folder to use: the one ``path`` points at, else ``tag``, else the one named by ``latest``.

    ``path`` may be a run dir, its ``checkpoints/`` folder or a tag folder. Returns (checkpoint root, tag);
    raises `CheckpointError` naming the folder when nothing usable is found.
    """
    p = Path(path)
    root = resolve_checkpoint_root(p)
    if is_tag_dir(p):
        if tag is not None and tag != p.name:
            raise CheckpointError(f"{p}: this is checkpoint tag {p.name!r}, but tag {tag!r} was asked for")
        return root, p.name
    if tag is None:
        tag = read_latest(root)
        if tag is None:
            tags = list_tags(root)
            if not tags:
                raise CheckpointError(
                    f"{p}: not a DeepSpeed checkpoint: no DeepSpeed model state files (*_model_states.pt) here or "
                    f"in a tag folder below, and no {LATEST_FILE} file"
                )
            raise CheckpointError(
                f"{root / LATEST_FILE}: missing; name a tag (tags here: {', '.join(tags) or 'none'})"
            )
    if not (root / tag).is_dir():
        tags = list_tags(root)
        raise CheckpointError(
            f"{root / tag}: no such checkpoint tag (tags here: {', '.join(tags) or 'none'})"
        )
    return root, tag
