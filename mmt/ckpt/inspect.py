"""`mmt ckpt inspect`: what a checkpoint folder holds and whether it is usable, without reading any weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from mmt.ckpt.layout import (
    LATEST_FILE,
    LATEST_UNIVERSAL_FILE,
    META_FILE,
    CheckpointError,
    is_complete,
    list_tags,
    read_latest,
    read_meta,
    resolve_checkpoint_root,
    resolve_tag_dir,
)
from mmt.ckpt.reader import ZeroCheckpoint
from mmt.ckpt.torchio import UntrustedCheckpointError


def _tag_status(tag_dir: Path) -> str:
    """mmt's saves: their ``mmt_meta.json``; any other DeepSpeed checkpoint: whether its own files check out."""
    if (tag_dir / "zero").is_dir():
        return "universal checkpoint"
    if (tag_dir / META_FILE).is_file():
        return "complete" if is_complete(tag_dir) else "incomplete (complete != true)"
    try:
        ck = ZeroCheckpoint(tag_dir, require_meta=False)
    except CheckpointError as e:
        return f"incomplete ({e})"
    if ck.made_by_mmt:
        return "incomplete (no mmt_meta.json)"
    return "complete (DeepSpeed checkpoint: every rank's files present and consistent)"


def inspect_checkpoint(path: str | os.PathLike, tag: str | None = None) -> dict[str, Any]:
    """A JSON-able summary of the checkpoint root at ``path`` and of one tag (``tag``, or the latest)."""
    root = resolve_checkpoint_root(path)
    tags = list_tags(root)
    latest = read_latest(root)
    info: dict[str, Any] = {
        "root": str(root),
        "latest": latest,
        "latest_universal": read_latest(root, LATEST_UNIVERSAL_FILE),
        "tags": [{"tag": t, "status": _tag_status(root / t)} for t in tags],
    }
    try:
        tag_dir = resolve_tag_dir(path, tag)
    except CheckpointError as e:
        info["error"] = str(e)
        info["complete"] = False
        return info
    info["tag"] = tag_dir.name
    meta: dict[str, Any] | None
    try:
        meta = read_meta(tag_dir)
    except CheckpointError as e:
        meta, info["meta_error"] = None, str(e)
    if (tag_dir / "zero").is_dir():
        info.update(_universal_summary(tag_dir, meta))
        return info
    try:
        ck = ZeroCheckpoint(tag_dir, require_meta=False)
    except UntrustedCheckpointError:  # not a damaged folder to describe: a file that must not be opened
        raise
    except CheckpointError as e:
        info.update({"complete": False, "error": str(e)})
        if meta:
            info.update({k: meta.get(k) for k in ("step", "zero_stage", "world_size", "dtype")})
            info["config"] = meta.get("config")
        return info
    entries = ck.entries.values()
    info.update(
        {
            "step": ck.step,
            "samples_seen": None if meta is None else meta.get("samples_seen"),
            "zero_stage": ck.stage,
            "world_size": ck.world_size,
            "dtype": ck.dtype,
            "num_parameters": ck.num_parameters,
            "num_tensors": sum(1 for e in entries if e.kind != "buffer"),
            "num_buffers": sum(1 for e in entries if e.kind == "buffer"),
            "bytes_per_rank": ck.bytes_per_rank(),
            "files": sorted(p.name for p in tag_dir.iterdir() if p.is_file()),
            "deepspeed_version": ck.model_state.get("ds_version"),
            "mlflow_run_id": None if meta is None else meta.get("mlflow_run_id"),
            "complete": meta is not None or not ck.made_by_mmt,
            "made_by": "mmt" if ck.made_by_mmt else "DeepSpeed (no mmt_meta.json)",
            "universal": False,
            "notes": ck.notes,
            "config": ck.config,
        }
    )
    if meta is None and ck.made_by_mmt:
        info["error"] = info.get("meta_error")
    else:
        info.pop("meta_error", None)
    return info


def _universal_summary(tag_dir: Path, meta: dict[str, Any] | None) -> dict[str, Any]:
    params = sorted(p.name for p in (tag_dir / "zero").iterdir() if p.is_dir())
    meta = meta or {}
    return {
        "universal": True,
        "step": meta.get("step"),
        "samples_seen": meta.get("samples_seen"),
        "zero_stage": meta.get("zero_stage"),
        "world_size": meta.get("world_size"),
        "dtype": meta.get("dtype"),
        "num_tensors": len(params),
        "complete": bool(meta),  # read_meta gives only a finished save's meta
        "config": meta.get("config"),
        "files": sorted(p.name for p in tag_dir.iterdir() if p.is_file()),
    }


def _human(n: int) -> str:
    x = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if x < 1000 or unit == "TB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1000
    return str(n)


def format_summary(info: dict[str, Any]) -> str:
    lines = [f"checkpoint root: {info['root']}"]
    latest = info.get("latest")
    for t in info["tags"]:
        mark = f" <- {LATEST_FILE}" if t["tag"] == latest else ""
        lines.append(f"  {t['tag']}: {t['status']}{mark}")
    if not info["tags"]:
        lines.append("  (no checkpoint tags)")
    if "tag" not in info:
        lines.append(f"error: {info.get('error')}")
        return "\n".join(lines)
    lines.append(f"tag: {info['tag']}" + ("  (universal checkpoint)" if info.get("universal") else ""))
    for key, label in (
        ("step", "step"),
        ("samples_seen", "samples seen"),
        ("zero_stage", "ZeRO stage"),
        ("world_size", "world size"),
        ("dtype", "dtype"),
        ("made_by", "written by"),
    ):
        if info.get(key) is not None:
            lines.append(f"  {label}: {info[key]}")
    if info.get("num_parameters") is not None:
        lines.append(
            f"  parameters: {info['num_parameters']:,} in {info['num_tensors']} tensors "
            f"(+ {info['num_buffers']} buffers)"
        )
    if info.get("bytes_per_rank"):
        per = ", ".join(f"rank {r}: {_human(b)}" for r, b in enumerate(info["bytes_per_rank"]))
        lines.append(f"  bytes per rank: {per}")
    lines.append(f"  complete: {'yes' if info.get('complete') else 'NO'}")
    if info.get("error"):
        lines.append(f"  problem: {info['error']}")
    for note in info.get("notes") or []:
        lines.append(f"  note: {note}")
    cfg = info.get("config")
    if cfg:
        lines.append("  config:")
        lines += ["    " + ln for ln in yaml.safe_dump(cfg, sort_keys=False).rstrip().splitlines()]
    return "\n".join(lines)
