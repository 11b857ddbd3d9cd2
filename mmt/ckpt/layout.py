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
    """The ``mmt_meta.json`` of a finished save: the one meta reader of mmt.

    Raises `CheckpointError` naming the file when it is missing, unreadable or not marked ``complete: true``:
    each means the save did not finish (rank 0 writes the file last). Scans that skip such saves use
    `is_complete`."""
    path = Path(tag_dir) / META_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing; the save of this checkpoint did not finish (mmt_meta.json is written last)"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    if meta.get("complete") is not True:
        raise CheckpointError(
            f"{path}: complete is not true; the save did not finish (not a complete checkpoint)"
        )
    return meta


def is_complete(tag_dir: str | os.PathLike) -> bool:
    """Whether ``tag_dir`` is a finished mmt save (`read_meta` succeeds)."""
    try:
        read_meta(tag_dir)
    except CheckpointError:
        return False
    return True


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


def complete_tags(ckpt_root: str | os.PathLike) -> list[tuple[int, str]]:
    """(step, tag) of every finished mmt save (``step_*`` with a complete meta) under ``ckpt_root``, oldest first."""
    return [
        (s, t)
        for t in list_tags(ckpt_root)
        if (s := step_of_tag(t)) is not None and is_complete(Path(ckpt_root) / t)
    ]


def resolve_tag_dir(path: str | os.PathLike, tag: str | None = None, *, complete: bool = False) -> Path:
    """The one checkpoint resolver: the tag folder that ``path`` (and ``tag``) name.

    ``path`` is a tag folder, a checkpoint root (``checkpoints/`` or any folder DeepSpeed saved into) or a run
    folder. Without ``tag`` the tag is, in this order: the one ``latest`` names if that save finished; the newest
    finished mmt save (a pointer to an interrupted save never wins); the one ``latest`` names (another program's
    checkpoint, judged from its files by `mmt.ckpt.reader`). ``complete=True`` (resume, `mmt eval`) also requires
    a finished mmt save. Raises `CheckpointError` naming the path or tag when nothing usable is there.
    """
    p = Path(path)
    root = resolve_checkpoint_root(p)
    if is_tag_dir(p):
        if tag is not None and tag != p.name:
            raise CheckpointError(f"{p}: this is checkpoint tag {p.name!r}, but tag {tag!r} was asked for")
        tag = p.name
    elif tag is None:
        tag = _default_tag(root, p)
    if not (root / tag).is_dir():
        tags = list_tags(root)
        raise CheckpointError(
            f"{root / tag}: no such checkpoint tag (tags here: {', '.join(tags) or 'none'})"
        )
    if complete:
        read_meta(root / tag)
    return root / tag


def _default_tag(root: Path, path: Path) -> str:
    latest = read_latest(root)
    if latest is not None and is_complete(root / latest):
        return latest
    finished = complete_tags(root)
    if finished:
        return finished[-1][1]
    if latest is not None:
        return latest
    tags = list_tags(root)
    if not tags:
        raise CheckpointError(
            f"{path}: not a DeepSpeed checkpoint: no DeepSpeed model state files (*_model_states.pt) here or "
            f"in a tag folder below, and no {LATEST_FILE} file"
        )
    raise CheckpointError(f"{root / LATEST_FILE}: missing; name a tag (tags here: {', '.join(tags)})")
