"""Load consolidated weights (`mmt ckpt convert` output) into a model: strict names and shapes, clear errors.

``load_pretrained(model, path)`` is how evaluation and fine-tuning start from a converted checkpoint (the
trainer calls it for ``train.init_weights``). ``only=["image"]`` loads one tower (and requires only that tower's
tensors), e.g. from an ``--only image`` export into a bigger model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from mmt.ckpt.convert import CONFIG_FILE, EXPORT_META_FILE, INDEX_FILE, SINGLE_FILE
from mmt.ckpt.layout import CheckpointError
from mmt.ckpt.select import prefixes_for
from mmt.model.factory import create_model


@dataclass
class LoadReport:
    path: Path
    loaded: list[str]
    skipped_model_keys: list[str]  # model tensors outside ``only`` (left as they were)


def weight_files(path: str | os.PathLike) -> dict[str, Path]:
    """``{tensor name: file}`` for a converted folder (single file or sharded + index) or one .safetensors file."""
    p = Path(path)
    if p.is_file():
        files = [p]
    elif (p / INDEX_FILE).is_file():
        try:
            index = json.loads((p / INDEX_FILE).read_text())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{p / INDEX_FILE}: not a safetensors index ({e})") from None
        missing = sorted({f for f in weight_map.values() if not (p / f).is_file()})
        if missing:
            raise CheckpointError(f"{p / INDEX_FILE}: shard file(s) missing: {', '.join(missing)}")
        return {k: p / f for k, f in weight_map.items()}
    elif (p / SINGLE_FILE).is_file():
        files = [p / SINGLE_FILE]
    else:
        raise CheckpointError(f"{p}: no {SINGLE_FILE} or {INDEX_FILE} (is it an `mmt ckpt convert` output?)")
    out: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                out.update({k: f for k in sf.keys()})
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read as safetensors ({e})") from None
    return out


def _exported_only(path: Path) -> list[str] | None:
    meta = (path if path.is_dir() else path.parent) / EXPORT_META_FILE
    if meta.is_file():
        try:
            return json.loads(meta.read_text()).get("only")
        except json.JSONDecodeError:
            return None
    return None


def load_pretrained(
    model: nn.Module, path: str | os.PathLike, *, only: Sequence[str] | None = None
) -> LoadReport:
    """Copy the weights at ``path`` into ``model`` in place, tensor by tensor.

    Strict: every tensor in the file must exist in the model with the same shape, and every model tensor (under
    ``only``'s towers / prefixes when given) must be in the file; otherwise `CheckpointError` lists what differs.
    Values are cast to each model tensor's dtype.
    """
    p = Path(path)
    files = weight_files(p)
    state = model.state_dict()
    prefixes = prefixes_for(only) if only else None

    def wanted(name: str) -> bool:
        return prefixes is None or any(name.startswith(x) or name == x.rstrip(".") for x in prefixes)

    file_keys = [k for k in files if wanted(k)]
    expected = [k for k in state if wanted(k)]
    missing = [k for k in expected if k not in files]
    unexpected = [k for k in file_keys if k not in state]
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) the model does not have ({', '.join(unexpected[:5])})")
    if missing:
        hint = ""
        exported = _exported_only(p)
        if exported and not only:
            hint = f" (this export holds only {exported}: pass only={exported})"
        problems.append(f"{len(missing)} model tensor(s) not in the file ({', '.join(missing[:5])}){hint}")
    shapes = []
    with _Readers(files) as readers:
        for k in file_keys:
            if k in state:
                shape = tuple(readers.get_slice(k).get_shape())
                if shape != tuple(state[k].shape):
                    shapes.append(f"{k}: {shape} in the file, {tuple(state[k].shape)} in the model")
        if shapes:
            problems.append(f"shape differs for {len(shapes)} ({'; '.join(shapes[:5])})")
        if not file_keys:
            problems.append(f"no tensor matches only={list(only or [])}")
        if problems:
            raise CheckpointError(f"{p}: does not fit the model: " + "; ".join(problems))
        with torch.no_grad():
            for k in file_keys:
                t = readers.get_tensor(k)
                state[k].copy_(t.to(state[k].dtype))
    return LoadReport(p, file_keys, [k for k in state if not wanted(k)])


class _Readers:
    """One open safetensors handle per file, closed together."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self._open: dict[Path, object] = {}

    def __enter__(self) -> _Readers:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._open.values():
            h.__exit__(None, None, None)  # type: ignore[attr-defined]
        self._open.clear()

    def _handle(self, key: str):  # noqa: ANN202

        f = self.files[key]
        if f not in self._open:
            self._open[f] = safe_open(str(f), framework="pt").__enter__()
        return self._open[f]

    def get_slice(self, key: str):  # noqa: ANN201
        return self._handle(key).get_slice(key)

    def get_tensor(self, key: str) -> torch.Tensor:
        return self._handle(key).get_tensor(key)


def create_pretrained(path: str | os.PathLike, overrides: Iterable[str] = ()) -> nn.Module:
    """The model described by ``<path>/config.yaml`` with the weights of ``path`` loaded (strict)."""
    p = Path(path)
    cfg = p / CONFIG_FILE
    if not cfg.is_file():
        raise CheckpointError(
            f"{cfg}: missing; build the model yourself and call load_pretrained(model, {p})"
        )
    model = create_model(cfg, list(overrides))
    load_pretrained(model, p, only=_exported_only(p))
    return model


def init_weights(model: nn.Module, path: str, only: Sequence[str] = ()) -> LoadReport | None:
    """Start a fresh run from converted weights: what ``train.init_weights`` / ``train.init_weights_only`` do.

    ``path`` '' does nothing; ``only`` lists towers or name prefixes (empty: every tensor, strict). Call it on
    the freshly built model before ``deepspeed.initialize`` (and not when resuming: the
    checkpoint's weights win).
    """
    if not path:
        return None
    picked = [x.strip() for x in only if x.strip()]
    return load_pretrained(model, path, only=picked or None)
