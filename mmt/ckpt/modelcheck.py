"""Does a checkpoint belong to a model config? Compared by config keys and by the tensor shapes the config builds.

A model config that builds different tensor shapes than the checkpoint holds would load wrong or not at all;
these checks turn that into an error naming the file and the differing keys before anything is written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf
from torch.overrides import TorchFunctionMode

from mmt.ckpt.layout import META_FILE, CheckpointError
from mmt.config import to_dict
from mmt.config.model import MultiModalConfig
from mmt.model.factory import create_model, load_model_config

if TYPE_CHECKING:
    from mmt.ckpt.reader import ZeroCheckpoint

# fields that label or regularise a run without changing the weights
NON_ARCHITECTURAL = ("name",)


def diff_dicts(
    a: Any, b: Any, prefix: str = "", ignore: tuple[str, ...] = NON_ARCHITECTURAL
) -> list[tuple[str, Any, Any]]:
    """``[(dotted key, value in a, value in b)]`` for every leaf that differs."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k in ignore:
                continue
            out += diff_dicts(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}{k}.", ignore)
        return out
    return [] if a == b else [(prefix.rstrip("."), a, b)]


def model_config_dict(config: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """The resolved model section of a model file, a run config file, or a resolved run-config dict."""
    if isinstance(config, dict):
        model = config.get("model", config)
        return to_dict(_model_config(model))

    return to_dict(load_model_config(config))


def _model_config(model: dict[str, Any]) -> Any:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(MultiModalConfig), model))


class _SkipFills(TorchFunctionMode):
    """Skips weight init's random and constant fills (``torch.nn.init.*``, ``Tensor.normal_`` ...): only shapes are
    read, and unfilled CPU tensors take address space but no memory."""

    _FILLS = frozenset(
        getattr(torch.Tensor, n)
        for n in ("normal_", "uniform_", "random_", "exponential_", "geometric_", "log_normal_", "cauchy_")
        + ("bernoulli_", "fill_", "zero_")
    )

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in self._FILLS or getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else (kwargs or {})["tensor"]
        return func(*args, **(kwargs or {}))


def expected_shapes(model_cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of the model a config builds, without filling (or touching the memory of) its weights.

    Built on CPU with the init fills skipped: ~30 ms for the base model. The meta device would avoid even the
    address space, but torch's meta kernels import ``torch._dynamo`` on first use (1.3-2.5 s here, longer than
    converting the base model), so it is only the fallback when the address space is refused.
    """
    cfg = _model_config(model_cfg)
    try:
        with _SkipFills():
            model = create_model(cfg)
    except (RuntimeError, MemoryError):  # strict overcommit refused the untouched allocations: sizes only
        with torch.device("meta"):
            model = create_model(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def is_model_config(cfg: dict[str, Any] | None) -> bool:
    """True when the run config's model section is an mmt `MultiModalConfig` (not some other module's)."""
    if not cfg or not isinstance(cfg.get("model"), dict):
        return False
    try:
        _model_config(cfg["model"])
    except Exception:
        return False
    return True


def shape_mismatches(have: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]]) -> list[str]:
    problems = []
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    wrong = [f"{k}: {have[k]} vs {want[k]}" for k in want if k in have and tuple(have[k]) != tuple(want[k])]
    if missing:
        problems.append(
            f"missing {len(missing)} tensor(s) ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})"
        )
    if unexpected:
        problems.append(
            f"unexpected {len(unexpected)} ({', '.join(unexpected[:4])}{', ...' if len(unexpected) > 4 else ''})"
        )
    if wrong:
        problems.append(
            f"shape differs for {len(wrong)} ({'; '.join(wrong[:4])}{'; ...' if len(wrong) > 4 else ''})"
        )
    return problems


def check_shapes_against_config(ck: ZeroCheckpoint, cfg: dict[str, Any]) -> None:
    """The checkpoint's tensors are exactly those the recorded model config builds."""
    if not is_model_config(cfg):
        ck.notes.append(
            "the recorded config is not an mmt model config: tensor shapes not checked against it"
        )
        return
    problems = shape_mismatches(ck.shapes(), expected_shapes(cfg["model"]))
    if problems:
        raise CheckpointError(
            f"{ck.model_file}: does not match the model config recorded in {ck.dir / META_FILE}: "
            + "; ".join(problems)
        )


def check_config_matches(ck: ZeroCheckpoint, config: str | os.PathLike | dict[str, Any]) -> None:
    """Refuse when ``config`` is not the model config the checkpoint was trained with."""
    src = str(config) if not isinstance(config, dict) else "the given config"
    if ck.config is None or "model" not in ck.config:
        raise CheckpointError(f"{ck.dir / META_FILE}: records no model config to compare {src} with")
    if isinstance(config, (str, Path)) and not is_model_config(ck.config):
        raise CheckpointError(f"{ck.dir / META_FILE}: its model config is not an mmt model config")
    mine = model_config_dict(config)
    theirs = model_config_dict(ck.config)
    diffs = diff_dicts(theirs, mine)
    if diffs:
        shown = "; ".join(f"model.{k}: {a!r} in the checkpoint, {b!r} in {src}" for k, a, b in diffs[:6])
        raise CheckpointError(
            f"{ck.dir / META_FILE}: trained with a different model config than {src}: {shown}"
            + (f" (and {len(diffs) - 6} more)" if len(diffs) > 6 else "")
        )
