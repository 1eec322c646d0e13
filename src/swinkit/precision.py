"""Precision names -> torch dtypes: the one table that training, inference and benchmarks read.

    fp32         float32 throughout
    bf16-mixed   autocast to bfloat16; weights, optimizer state and loss stay float32
    fp16-mixed   autocast to float16, with loss scaling (the trainer's GradScaler)
    amp          the mixed precision the device does best (`amp_dtype`): what benchmarks measure

"bf16", "fp16" and "float32" are accepted for "bf16-mixed", "fp16-mixed" and "fp32".
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed")  # what a training config may say

_AUTOCAST_DTYPES = {"fp32": None, "float32": None, "bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16,
                    "fp16-mixed": torch.float16, "fp16": torch.float16}


def amp_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CPU; fp16 on CUDA unless the GPU does bf16 (then bf16: no loss scaling needed)."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast_dtype(precision: str | None, device: torch.device | str = "cpu") -> torch.dtype | None:
    """The dtype autocast runs matmuls in under `precision`; None for fp32 (no autocast)."""
    if precision is None:
        return None
    if precision == "amp":
        return amp_dtype(device)
    if precision not in _AUTOCAST_DTYPES:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return _AUTOCAST_DTYPES[precision]


def autocast(precision: str | None, device: torch.device | str):
    """`torch.autocast` for `precision` on `device`, or a no-op context for fp32."""
    device = torch.device(device)
    dtype = autocast_dtype(precision, device)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
