"""The one map from mmt's precision names (`train.precision`, `mmt ckpt convert --dtype`) to torch dtypes."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(precision: str) -> torch.dtype:
    """``"bf16"`` -> ``torch.bfloat16``; a name outside `DTYPES` raises ValueError listing the choices."""
    try:
        return DTYPES[precision]
    except KeyError:
        raise ValueError(f"precision {precision!r}: choose one of {sorted(DTYPES)}") from None
