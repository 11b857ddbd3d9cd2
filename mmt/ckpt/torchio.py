"""The one place mmt unpickles a ``.pt`` file: ``weights_only`` with an explicit allow-list, or a clear refusal.

A pickle can run any code while it loads, and checkpoints are shared, downloaded and converted from other
people's runs, so a checkpoint is untrusted input. `load_pt` loads with ``torch.load(weights_only=True)`` plus
exactly the classes DeepSpeed 0.19's checkpoints hold (found by saving ZeRO 0-3 fp32/bf16 and universal
checkpoints and listing what their pickles name: its loss scaler, the ZeRO stage enum, fragment addresses) and
the numpy arrays of the RNG states mmt keeps in the client state. A file that names anything else is refused
with `UntrustedCheckpointError` naming the file and the class; only an explicit trust decision (``mmt ckpt ...
--trust-checkpoint``, ``mmt eval --trust-checkpoint``, ``train.trust_checkpoint``) loads it fully.

DeepSpeed itself calls ``torch.load(..., weights_only=False)`` inside ``engine.load_checkpoint``, its
ZeRO-to-fp32 reader and its universal converter. `checkpoint_loading` routes those calls through the same check
while it is active, so a hostile file is refused before any of its code can run, whichever code opens it::

    with checkpoint_loading(trust=cfg.train.trust_checkpoint):
        engine.load_checkpoint(...)
"""

from __future__ import annotations

import contextvars
import functools
import pickle
import re
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmt.ckpt.layout import CheckpointError

TRUST_FLAG = "--trust-checkpoint"
TRUST_KEY = "train.trust_checkpoint"

# torch.load as imported: the checked loaders below call it, whatever `checkpoint_loading` puts in its place.
_torch_load = torch.load
_TRUST: contextvars.ContextVar[bool] = contextvars.ContextVar("mmt_trust_checkpoint", default=False)


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint file's pickle names a class outside the allow-list: loading it could run code from the file."""


@functools.cache
def allowed_globals() -> tuple[Any, ...]:
    """The classes and functions a checkpoint may name, beyond torch's own tensors and containers."""
    out: list[Any] = [np.ndarray, np.dtype, np._core.multiarray._reconstruct]
    for dt in (np.uint32, np.int64, np.float64, np.float32, np.uint8, np.int32, np.bool_):
        out.append(type(np.dtype(dt)))
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        out += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:  # reading without deepspeed installed: its classes are refused like any other
        pass
    return tuple(out)


@functools.cache
def _allowed_names() -> frozenset[str]:
    return frozenset(f"{g.__module__}.{g.__qualname__}" for g in allowed_globals())


def _unsafe_names(path: Any) -> list[str]:
    """The globals ``path``'s pickle names beyond torch's defaults and the allow-list (reads no tensor data)."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    return [n for n in names if n not in _allowed_names()]


def _culprit(path: Any, err: Exception) -> str:
    """The class the weights-only unpickler stopped at, from torch's message or a scan of the file."""
    m = re.search(r"GLOBAL ([\w.]+)", str(err))
    if m:
        return m.group(1)
    try:
        extra = _unsafe_names(path)
        if extra:
            return ", ".join(extra[:3])
    except Exception:  # not a zip checkpoint: fall back to torch's first line
        pass
    return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__


def refusal(path: Any, culprit: str) -> str:
    return (
        f"{path}: refused to load: it needs {culprit}, which no DeepSpeed checkpoint holds (unpickling it could "
        f"run code from the file); if you trust whoever made it, pass {TRUST_FLAG} ({TRUST_KEY}=true for training)"
    )


def _checked_torch_load(
    f: Any, *args: Any, trust: bool, weights_only: bool | None = None, **kwargs: Any
) -> Any:
    """``torch.load`` with mmt's policy: full unpickling only when trusted, else weights-only + allow-list."""
    if trust:
        return _torch_load(f, *args, weights_only=False if weights_only is None else weights_only, **kwargs)
    kwargs.pop("pickle_module", None)  # weights_only brings its own restricted unpickler
    try:
        with torch.serialization.safe_globals(list(allowed_globals())):
            return _torch_load(f, *args, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        raise UntrustedCheckpointError(refusal(f, _culprit(f, e))) from None


def trusted() -> bool:
    """Whether the innermost `checkpoint_loading` trusts checkpoints (False outside any)."""
    return _TRUST.get()


@contextmanager
def checkpoint_loading(trust: bool) -> Iterator[None]:
    """While active, every ``torch.load`` (mmt's and DeepSpeed's own) follows ``trust``: full unpickling when
    True, weights-only + allow-list (refusing anything else) when False."""
    token = _TRUST.set(trust)
    previous = torch.load
    torch.load = functools.partial(_checked_torch_load, trust=trust)  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = previous
        _TRUST.reset(token)


def check_files(paths: Iterable[str | Path], *, trust: bool | None = None) -> None:
    """Vet a checkpoint's files before anything opens them: `UntrustedCheckpointError` for the first whose pickle
    names a class outside the allow-list. Reads only each file's pickle, not its tensors, so a whole folder
    (every rank's files, every universal ``zero/<param>/*.pt``) is vetted in moments before DeepSpeed starts.
    ``trust`` None follows the enclosing `checkpoint_loading`."""
    if trusted() if trust is None else trust:
        return
    for p in paths:
        if not zipfile.is_zipfile(p):  # legacy torch format: no cheap scan, a full weights-only load vets it
            load_pt(p, mmap=False, trust=False)
            continue
        try:
            bad = _unsafe_names(p)
        except Exception as e:  # a damaged archive: the loaders report it with the file's name
            raise CheckpointError(f"{p}: cannot read ({type(e).__name__}: {str(e)[:200]})") from None
        if bad:
            raise UntrustedCheckpointError(refusal(p, ", ".join(bad[:3])))


def load_pt(path: str | Path, mmap: bool = True, *, trust: bool | None = None) -> Any:
    """Load a checkpoint file on CPU, memory-mapped where the file format allows it.

    ``trust`` None follows the enclosing `checkpoint_loading` (untrusted outside one). Raises
    `UntrustedCheckpointError` naming the file and the class when the file needs more than the allow-list, and
    `CheckpointError` naming the file when it is missing, truncated or not a torch file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (the save was interrupted or the file was truncated)")
    use_mmap = mmap and zipfile.is_zipfile(path)
    try:
        return _checked_torch_load(
            path, map_location="cpu", mmap=use_mmap, trust=trusted() if trust is None else trust
        )
    except CheckpointError:
        raise
    except Exception as e:  # torch raises RuntimeError / EOFError / UnpicklingError / zipfile errors here
        raise CheckpointError(
            f"{path}: cannot read ({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}); "
            "the file is corrupt or truncated"
        ) from None
