"""Reading DeepSpeed's ``.pt`` files: memory-mapped, with pickle restricted to the few classes DeepSpeed stores.

``weights_only=True`` refuses arbitrary pickled code; DeepSpeed's files need a handful of extra classes (its loss
scaler, the ZeRO stage enum, fragment addresses) and the numpy RNG states mmt puts in the client state, so those
are allow-listed. A file that still needs something else is read with full pickle (the files come from our own
runs) and a warning names the file.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from mmt.ckpt.layout import CheckpointError

log = logging.getLogger(__name__)


def _safe_globals() -> list[Any]:
    import numpy as np

    out: list[Any] = [np.ndarray, np.dtype]
    for dt in (np.uint32, np.int64, np.float64, np.float32, np.uint8, np.int32):
        out.append(type(np.dtype(dt)))
    try:
        out.append(np._core.multiarray._reconstruct)
    except AttributeError:  # numpy < 2
        out.append(np.core.multiarray._reconstruct)  # type: ignore[attr-defined]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        out += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:  # reading without deepspeed installed: the full-pickle fallback below handles it
        pass
    return out


def load_pt(path: str | Path, mmap: bool = True) -> Any:
    """Load a DeepSpeed checkpoint file on CPU, memory-mapped where the file format allows it.

    Raises `CheckpointError` naming the file when it is missing, truncated or not a torch file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (the save was interrupted or the file was truncated)")
    use_mmap = mmap and zipfile.is_zipfile(path)
    try:
        try:
            with torch.serialization.safe_globals(_safe_globals()):
                return torch.load(path, map_location="cpu", mmap=use_mmap, weights_only=True)
        except pickle.UnpicklingError as e:
            log.warning("%s: needs full pickle to load (%s)", path, str(e).splitlines()[0][:200])
            return torch.load(path, map_location="cpu", mmap=use_mmap, weights_only=False)
    except CheckpointError:
        raise
    except Exception as e:  # torch raises RuntimeError / EOFError / UnpicklingError / zipfile errors here
        raise CheckpointError(
            f"{path}: cannot read ({type(e).__name__}: {str(e).splitlines()[0][:300]}); the file is corrupt or truncated"
        ) from None
