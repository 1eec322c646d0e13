"""`optimize_for_inference`: a model -> its frozen fast path (`fast.FastSwin`) in a precision.

fp32 / bf16 / fp16 cast the fast path to that dtype; int8 applies `int8.quantize_linears` to it.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from ..models.swin import SwinTransformer
from ..precision import INT8, PrecisionError, inference_dtype, slow_precision_note
from .fast import FastSwin
from .int8 import quantize_linears

__all__ = ["optimize_for_inference"]

log = logging.getLogger("swinkit")


def optimize_for_inference(model: SwinTransformer, *, dtype: torch.dtype | str | None = None,
                           use_onednn: bool | None = None, compile: bool = False,
                           calibration: Iterable[torch.Tensor] | None = None) -> nn.Module:
    """A frozen, eval-only copy of `model` that computes the same logits faster (see `infer.fast`).

    `model` is not modified. `dtype` casts the copy: None/fp32, or "bf16"/"fp16" (names or torch dtypes,
    `precision.inference_dtype`) on CPU and CUDA. bf16 on a CPU with BF16 units (AVX512-BF16, AMX) runs
    oneDNN's bf16 kernels: Swin-T measured 1.8-2.2x the fp32 path's img/s at batch 1 and 2.5-3.2x at
    batch 8 on an AMX Xeon (README). fp16 is for CUDA and runs on a CPU too (PyTorch's fp16 kernels;
    fast only with AVX512-FP16/AMX-FP16). Without the units either still runs, slowly, and a warning
    says so (`precision.slow_precision_note`). Softmax is computed in fp32 (`attention_probs` promotes
    the scores) and LayerNorm accumulates in fp32 (torch's kernels do for bf16/fp16 input); measured,
    neither more fp32 (scores matmul, constants, LayerNorm) nor a bf16 softmax changed top-1 agreement
    or logit error measurably: the error comes from the bf16 weights and activations. bf16 logits
    differ from fp32 by 1-3% of the largest logit (Fashion-MNIST recipe model: top-1 89.55 vs 89.59%,
    agreement 99.91%), fp16 by ~0.1-0.3%. The copy takes images of any float dtype (cast to its own)
    and returns fp32 logits.
    `use_onednn`: None = `onednn.linear` on CPU when oneDNN is available (it picks oneDNN or MKL per shape).
    On CPU the first forward flushes denormals to zero process-wide (`precision.flush_denormals`) and has
    glibc keep freed memory for reuse (`allocator.keep_freed_memory`). `compile=True` wraps the
    result in `torch.compile` (static shapes: one compilation per input size). Measured on
    an AVX-512 AMD CPU it is ~1.8x *slower* than the uncompiled fast path: inductor lowers the
    linears to the default BLAS instead of oneDNN; it is there for CUDA.
    `dtype="int8"` (CPU): the linears run in oneDNN's int8 kernels, calibrated on `calibration`, an
    iterable of preprocessed image batches (`infer.int8.quantize_linears`; the rest stays fp32).
    Input `[B, in_chans, H, W]` of any size -> logits `[B, num_classes]`.
    """
    if dtype == INT8:
        if calibration is None:
            raise PrecisionError("int8 inference needs calibration images: pass calibration=<image batches>")
        if compile:
            raise PrecisionError("int8 inference runs oneDNN's int8 kernels eagerly; compile=True is for fp32/bf16/fp16")
        return quantize_linears(FastSwin(model, use_onednn=use_onednn), calibration)
    dtype = inference_dtype(dtype)
    fast = FastSwin(model, use_onednn=use_onednn)
    if dtype != torch.float32:
        fast = fast.to(dtype)
        note = slow_precision_note(dtype, next(model.parameters()).device)
        if note:
            log.warning("%s", note)
    if compile:
        # Inductor's SDPA pattern rewrite assumes 4-D attention and fails on [B, windows, heads, N, N].
        return torch.compile(fast, dynamic=False, options={"pattern_matcher": False})
    return fast
