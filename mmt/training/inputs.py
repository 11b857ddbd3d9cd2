"""From a loader batch to model keyword arguments that are safe to run on every rank.

ZeRO-3 gathers each module's parameters collectively during the forward pass, so every rank must call the same
modules in the same order: a rank whose batch has no audio must still run the audio tower, or training hangs
(nccl) or crashes (gloo). `model_inputs` therefore always feeds every tower the task uses: a modality missing from
the batch becomes a small all-zero dummy, and absent rows (``<m>_present`` False, all-False mask) get an all-True
mask so attention over them is well defined (an all-masked row gives NaN, whose gradient would poison the
weights even with a zero loss weight). The losses then select present rows only, so dummies contribute exactly
zero gradient.
"""

from __future__ import annotations

from typing import Any

import torch

from mmt.config.model import MultiModalConfig

FEATURE_KEY = {"text": "text_inputs", "image": "image_features", "audio": "audio_features"}
MASK_KEY = {"text": "text_attention_mask", "image": "image_attention_mask", "audio": "audio_attention_mask"}


def batch_size(batch: dict[str, Any]) -> int:
    if "keys" in batch:
        return len(batch["keys"])
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
    raise ValueError("cannot tell the batch size: no 'keys' and no tensor in the batch")


def _dummy(
    m: str, cfg: MultiModalConfig, b: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    tower = getattr(cfg, m)
    if tower.input == "features":
        return torch.zeros(b, 1, tower.feature_dim, dtype=dtype, device=device), torch.ones(
            b, 1, dtype=torch.bool, device=device
        )
    if m == "text":
        ids = torch.tensor([[1, 2]], device=device).expand(b, 2).contiguous()  # bos, eos
        return ids, torch.ones(b, 2, dtype=torch.bool, device=device)
    if m == "image":
        return torch.zeros(
            b, tower.channels, tower.image_size, tower.image_size, dtype=dtype, device=device
        ), None
    if tower.input == "spectrogram":
        n = tower.patch_frames
        return torch.zeros(b, n, tower.n_mels, dtype=dtype, device=device), torch.ones(
            b, n, dtype=torch.bool, device=device
        )
    n = tower.hop_length * tower.patch_frames
    return torch.zeros(b, n, dtype=dtype, device=device), torch.ones(b, n, dtype=torch.bool, device=device)


def model_inputs(
    batch: dict[str, Any],
    cfg: MultiModalConfig,
    modalities: list[str],
    device: torch.device,
    float_dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(forward kwargs for ``modalities``, present masks (B,) per modality), on ``device``.

    Every modality in ``modalities`` is always in the kwargs (real data, or a dummy), so all ranks run the same
    module graph whatever mix of modalities their batch holds.
    """
    b = batch_size(batch)
    kwargs: dict[str, torch.Tensor] = {}
    present: dict[str, torch.Tensor] = {}
    for m in modalities:
        x = batch.get(FEATURE_KEY[m])
        mask = batch.get(MASK_KEY[m])
        if x is None:
            x, mask = _dummy(m, cfg, b, device, float_dtype)
            p = torch.zeros(b, dtype=torch.bool, device=device)
        else:
            x = x.to(device, non_blocking=True)
            if x.is_floating_point():
                x = x.to(float_dtype)
            p = batch.get(f"{m}_present")
            p = torch.ones(b, dtype=torch.bool, device=device) if p is None else p.to(device).bool()
            if mask is not None:
                mask = mask.to(device, non_blocking=True).bool()
                p = p & mask.any(dim=-1)
                # Absent rows attend over the zeros rather than over nothing. Applied unconditionally (a no-op
                # when every row is present): testing ``p.all()`` first would sync the host every step.
                mask = mask | ~p[:, None]
        kwargs[FEATURE_KEY[m]] = x
        if mask is not None:
            kwargs[MASK_KEY[m]] = mask
        present[m] = p
    return kwargs, present


def count_tokens(
    kwargs: dict[str, torch.Tensor], present: dict[str, torch.Tensor], tokens_per_sample: dict[str, int]
) -> torch.Tensor | int:
    """Model tokens of the present rows: real text tokens, plus each present image / clip's token count.

    A 0-d tensor on the batch's device (no ``.item()``: the trainer sums it and reads it once per log line)."""
    total: torch.Tensor | int = 0
    for m, p in present.items():
        if m == "text" and MASK_KEY[m] in kwargs:
            total = total + (kwargs[MASK_KEY[m]].bool() & p[:, None]).sum()
        else:
            total = total + p.sum() * tokens_per_sample.get(m, 0)
    return total


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
    }
