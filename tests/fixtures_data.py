"""Helpers shared by the data tests: a typed config over the tiny tri-modal model, and loader iteration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mmt.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]


def data_config(
    tmp_path: Path, task: str = "retrieval", overrides: tuple[str, ...] = (), **data: Any
) -> Config:
    """The tiny tri-modal model + a ``data`` section; the shard cache lives under ``tmp_path``."""
    data.setdefault("cache_dir", str(tmp_path / "cache"))
    data.setdefault("num_workers", 0)
    tmp_path.mkdir(parents=True, exist_ok=True)  # a sub-folder per simulated node is fine
    path = tmp_path / f"cfg-{task}.yaml"
    path.write_text(
        yaml.safe_dump(
            {"model": str(ROOT / "configs/model/tiny_tri.yaml"), "data": data, "train": {"task": task}}
        )
    )
    return load_config(path, list(overrides))


def epoch_keys(loader: Any, limit: int | None = None) -> list[list[str]]:
    """Keys of each batch of the loader's current epoch (or of the first ``limit`` batches)."""
    out = []
    for batch in loader:
        out.append(list(batch["keys"]))
        if limit is not None and len(out) == limit:
            break
    return out
