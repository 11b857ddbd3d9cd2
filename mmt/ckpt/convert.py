"""ZeRO checkpoint -> consolidated ``safetensors`` weights (one file, or shards plus the Hugging Face index).

Streams tensor by tensor (see `mmt.ckpt.reader`): memory holds one tensor and a bounded window of the mapped
rank partitions, whatever the model size. The output folder is assembled under a temporary name next to the
destination and renamed into place at the end, so an interrupted conversion never leaves a folder that looks
finished.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from mmt.ckpt.layout import CheckpointError
from mmt.ckpt.modelcheck import check_config_matches, check_shapes_against_config
from mmt.ckpt.reader import ZeroCheckpoint
from mmt.ckpt.safetensors_stream import SafetensorsStreamWriter, nbytes
from mmt.ckpt.select import select_names
from mmt.precision import DTYPES

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.yaml"
EXPORT_META_FILE = "mmt_export.json"
OUT_DTYPES = DTYPES
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 1 << 10,
    "MIB": 1 << 20,
    "GIB": 1 << 30,
    "TIB": 1 << 40,
}


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"500MiB"`` -> 524288000, ``"1234"`` -> 1234 bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB, 2GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass
class ConvertResult:
    out_dir: Path
    files: list[str]
    num_tensors: int
    total_bytes: int
    step: int | None


def _out_dtype(src: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    return dtype if src.is_floating_point else src


def plan_shards(
    specs: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_size: int | None
) -> list[list[int]]:
    """Greedy in checkpoint order (as Hugging Face does): a new shard starts when the next tensor would overflow."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(specs):
        n = nbytes(shape, dtype)
        if max_shard_size is not None and shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def _progress(total: int, enabled: bool) -> Any:
    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="convert",
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def _staging_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def publish_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move a finished staging folder to ``out`` (replacing an old one only with ``overwrite``)."""
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"{out}: already exists (pass --overwrite to replace it)")
        else:
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
            return
    os.replace(tmp, out)


def check_output_free(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: already exists (pass --overwrite to replace it)")


def convert_checkpoint(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tag: str | None = None,
    dtype: str = "fp32",
    max_shard_size: str | int | None = None,
    only: list[str] | None = None,
    config: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    read_budget: int = 64 << 20,
) -> ConvertResult:
    """Consolidate the ZeRO checkpoint at ``path`` (run dir, ``checkpoints/`` or a tag folder) into ``out``.

    ``only``: modality names (``image``) or name prefixes to export on their own. ``config``: a model or run
    config the checkpoint must have been trained with (refused with the differing keys otherwise).
    """
    if dtype not in OUT_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(OUT_DTYPES)}")
    out = Path(out)
    check_output_free(out, overwrite)
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    ck = ZeroCheckpoint(path, tag, read_budget=read_budget)
    cfg = ck.config
    if config is not None:
        check_config_matches(ck, config)
    if cfg is not None:
        check_shapes_against_config(ck, cfg)
    names = select_names(ck.entries, only)
    target = OUT_DTYPES[dtype]
    specs = [(n, ck.entries[n].shape, _out_dtype(ck.entries[n].dtype, target)) for n in names]
    shards = plan_shards(specs, limit)
    if len(shards) == 1:
        filenames = [SINGLE_FILE]
    else:
        filenames = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = sum(nbytes(s, d) for _, s, d in specs)
    metadata = {
        "format": "pt",
        "mmt.tag": ck.tag,
        "mmt.step": str(ck.step),
        "mmt.zero_stage": str(ck.stage),
        "mmt.world_size": str(ck.world_size),
        "mmt.dtype": dtype,
    }

    tmp = _staging_dir(out)
    writer: SafetensorsStreamWriter | None = None
    try:
        bar = _progress(total, progress)
        shard_of = {i: s for s, idx in enumerate(shards) for i in idx}
        # fp32 out of fp32 masters: the values go from the mapped partitions to the file with no copy in between
        stream = ck.iter_tensors(names, pieces=True)
        current = -1
        for i, (name, pieces) in enumerate(stream):
            s = shard_of[i]
            if s != current:
                if writer is not None:
                    writer.close()
                current = s
                writer = SafetensorsStreamWriter(tmp / filenames[s], [specs[j] for j in shards[s]], metadata)
            if all(t.dtype == specs[i][2] for t in pieces):
                writer.write_pieces(name, pieces)  # type: ignore[union-attr]
            else:
                t = (torch.cat(pieces) if len(pieces) > 1 else pieces[0]).to(specs[i][2]).view(specs[i][1])
                writer.write(name, t)  # type: ignore[union-attr]
                del t
            bar.update(nbytes(specs[i][1], specs[i][2]))
            del pieces
        if writer is not None:
            writer.close()
            writer = None
        bar.close()
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": total},
                "weight_map": {specs[i][0]: filenames[s] for s, idx in enumerate(shards) for i in idx},
            }
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if cfg is not None and isinstance(cfg.get("model"), dict):
            (tmp / CONFIG_FILE).write_text(yaml.safe_dump(cfg["model"], sort_keys=False))
        export = {
            "source": str(ck.dir),
            "tag": ck.tag,
            "step": ck.step,
            "zero_stage": ck.stage,
            "world_size": ck.world_size,
            "trained_dtype": ck.dtype,
            "dtype": dtype,
            "only": only or None,
            "num_tensors": len(specs),
            "total_size": total,
            "files": filenames,
            "notes": ck.notes,
            "train_config": cfg,
        }
        (tmp / EXPORT_META_FILE).write_text(json.dumps(export, indent=2, default=str) + "\n")
        publish_dir(tmp, out, overwrite)
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConvertResult(out, filenames, len(specs), total, ck.step)
