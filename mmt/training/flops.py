"""Peak FLOP/s per device, for model FLOPs utilisation (MFU = achieved training FLOP/s / peak).

Dense (no sparsity) tensor-core peaks from the vendors' data sheets, per precision; fp32 uses the TF32 tensor-core
peak where the GPU has one (that is what ``torch.backends.cuda.matmul.allow_tf32`` would reach). Matching is by
substring of ``torch.cuda.get_device_name()``, most specific first. CPUs have no table entry: give
``train.peak_tflops`` to get an MFU there.
"""

from __future__ import annotations

import torch

# name substring -> {precision: TFLOP/s}; longer, more specific names first.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("GH200", {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 418.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0}),
    ("H800", {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0}),
    ("B200", {"bf16": 2250.0, "fp16": 2250.0, "fp32": 1100.0}),
    ("B100", {"bf16": 1750.0, "fp16": 1750.0, "fp32": 875.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),
    ("A800", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5}),
    ("A6000", {"bf16": 155.0, "fp16": 155.0, "fp32": 77.0}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0}),
    ("L40", {"bf16": 181.0, "fp16": 181.0, "fp32": 90.5}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0}),
    ("V100", {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7}),
    ("T4", {"bf16": 0.0, "fp16": 65.0, "fp32": 8.1}),
    ("RTX 4090", {"bf16": 165.0, "fp16": 165.0, "fp32": 82.6}),
    ("RTX 3090", {"bf16": 71.0, "fp16": 71.0, "fp32": 35.6}),
    ("MI300X", {"bf16": 1307.0, "fp16": 1307.0, "fp32": 163.4}),
    ("MI250X", {"bf16": 383.0, "fp16": 383.0, "fp32": 95.7}),
]


def lookup_peak_tflops(device_name: str, precision: str) -> float | None:
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            v = peaks.get(precision, 0.0)
            return v or None
    return None


def peak_flops_per_device(
    device: torch.device, precision: str, configured_tflops: float = 0.0
) -> float | None:
    """Peak FLOP/s of one device: ``configured_tflops`` if set, else the table for a known GPU, else None."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type == "cuda":
        tf = lookup_peak_tflops(torch.cuda.get_device_name(device), precision)
        return tf * 1e12 if tf else None
    return None


def mfu(
    flops_per_sample: float, samples_per_s: float, world_size: int, peak_per_device: float | None
) -> float | None:
    """Fraction of the cluster's peak reached: ``flops/sample * samples/s / (world * peak)``."""
    if not peak_per_device or samples_per_s <= 0:
        return None
    return flops_per_sample * samples_per_s / (world_size * peak_per_device)
