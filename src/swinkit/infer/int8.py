"""PyTorch-native INT8 inference: the fast path with its linears in oneDNN's int8 kernels.

    fast = optimize_for_inference(model, dtype="int8", calibration=batches)   # CPU

A policy applied to a `FastSwin` from outside (`quantize_linears`), like the fast path itself is
applied to the model: the block definition is untouched, each linear layer's `FastLinear.dense`
is replaced by `Int8Linear.dense`. What runs in INT8 and what stays float:

* Every linear of the blocks and patch merging (qkv, proj, fc1, fc2, reduction): weights int8 per
  output channel, symmetric (scale max|w| / 127; 7-bit, max|w| / 63, where oneDNN's u8 x s8 kernels
  would saturate: no VNNI, probed by `int16_saturation`); activations uint8 per tensor, asymmetric, over the
  min/max the layer's input reached on the calibration images (ONNX Runtime's "minmax").
  oneDNN chooses the instructions: AMX-INT8, AVX512-VNNI / AVX-VNNI, or AVX2.
* fc1 hands fc2 uint8 directly (GELU fused, requantized to the range fc2 was calibrated on):
  no float tensor between the two MLP linears. Where oneDNN's int8 kernels lack VNNI their fused GELU
  is slow, and fc1 writes its pre-activation as uint8 instead (in the range it reached on the
  calibration images, from -4 up), which one 256-entry table (`gelu_lookup_table`, swinkit's
  `byte_lookup` kernel) turns into fc2's uint8 input (`gelu_by_table`). The other linears return fp32 to LayerNorm,
  the attention matmuls, softmax and the residual adds, which stay fp32, as do the patch
  embedding and the classifier head (the same float islands as `quantize`'s "vnni" scheme).

Measured on a 2-core AMX Xeon (README "Measured"): Swin-T at batch 8 2.3-2.6x the fp32 fast path and
2.5-2.8x the fp32 ONNX Runtime graph; the Fashion-MNIST recipe model loses 0.07 points top-1 (89.59 ->
89.52, top-1 agreement 99.75%).
"""
from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .. import native
from ..policy import specialise
from ..precision import PrecisionError
from .fast import FastLinear, FastMlp, FastSwin

__all__ = ["Int8Linear", "activation_qparams", "gelu_by_table", "gelu_lookup_table", "int16_saturation", "int8_linear",
           "is_int8", "quantize_linears", "quantize_uint8"]

log = logging.getLogger("swinkit")


def available() -> bool:
    """Whether this PyTorch build has oneDNN's int8 linear (CPU)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


def int8_linear(x: torch.Tensor, input_qparams: tuple[float, int], packed_weight: torch.Tensor,
                weight_scale: torch.Tensor, weight_zero_point: torch.Tensor, bias: torch.Tensor | None = None, *,
                gelu: bool = False, output_qparams: tuple[float, int] | None = None) -> torch.Tensor:
    """THE int8 linear: oneDNN's `qlinear_pointwise` of uint8 `x` `[rows, K]` (in `input_qparams`) and a
    weight prepacked by `qlinear_prepack` (per-channel `weight_scale`), plus fp32 `bias`, GELU fused when
    asked (the exact, erf GELU); fp32 out, or uint8 in `output_qparams` when given."""
    scale, zero_point = input_qparams
    out_scale, out_zero, out_dtype = (1.0, 0, torch.float32) if output_qparams is None else (*output_qparams, None)
    return torch.ops.onednn.qlinear_pointwise(
        x, scale, zero_point, packed_weight, weight_scale, weight_zero_point,
        None if bias is None else bias.float(), out_scale, out_zero, out_dtype,
        "gelu" if gelu else "none", [], "none" if gelu else "")


@functools.lru_cache(maxsize=1)
def int16_saturation() -> bool:
    """Whether oneDNN's u8 x s8 kernels saturate here: without VNNI (AVX2, AVX-512 without VNNI, or
    `ONEDNN_MAX_CPU_ISA` set below it) a pair of u8 x s8 products is summed in int16 first, and
    255 * 127 * 2 overflows it. Measured once with a probe product whose exact value is known;
    where it saturates, weights get 7 bits (255 * 63 * 2 fits)."""
    inputs = torch.full((4, 64), 255, dtype=torch.uint8)
    weight = torch.full((8, 64), 127, dtype=torch.int8)
    packed = torch.ops.onednn.qlinear_prepack(weight, None)
    out = int8_linear(inputs, (1.0, 0), packed, torch.ones(8), torch.zeros(8, dtype=torch.long))
    return not bool((out == 255 * 127 * 64).all())


GELU_TABLE_LOW = -4.0  # where a GELU table's pre-activation range starts at the lowest: |GELU(z)| < 1.3e-4 below


@functools.lru_cache(maxsize=1)
def gelu_by_table() -> bool:
    """Whether fc1's GELU runs as a 256-entry table over its uint8 pre-activation (`native.byte_lookup`)
    instead of fused into oneDNN's int8 kernel: where that kernel lacks VNNI (`int16_saturation`), as
    on AVX2-only CPUs, its fused GELU costs more than the table, and swinkit's kernels are built. On
    an emulated AVX2 CPU (`scripts/emulate_cpu.sh avx2`) Swin-T's MLP GELUs took ~38 ms of a ~530 ms
    INT8 call at batch 8 by isolated timing; with VNNI the fused GELU is free."""
    return int16_saturation() and native.kernels_available()


def gelu_lookup_table(pre_qparams: tuple[float, int], out_qparams: tuple[float, int]) -> torch.Tensor:
    """The 256 uint8 outputs of GELU, one per uint8 input code: code u stands for (u - zero) * scale in
    `pre_qparams`; its exact (erf) GELU, in float64, is quantized in `out_qparams` as `quantize_uint8`."""
    scale, zero = pre_qparams
    out_scale, out_zero = out_qparams
    return _rounded_to_uint8(F.gelu((torch.arange(256, dtype=torch.float64) - zero) * scale), out_scale, out_zero)


def _rounded_to_uint8(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """clamp(round(x / scale) + zero_point, 0, 255) as uint8, computed in x's dtype (round half to even)."""
    return (torch.round(x / scale) + zero_point).clamp_(0, 255).to(torch.uint8)


def activation_qparams(low: float, high: float) -> tuple[float, int]:
    """uint8 (scale, zero point) covering [low, high] and 0 (asymmetric, as ONNX Runtime's minmax)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255.0
    if scale == 0.0:
        return 1.0, 0
    return scale, int(min(max(round(-low / scale), 0), 255))


def quantize_uint8(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """clamp(round(x / scale) + zero_point, 0, 255) as a uint8 tensor (round half to even).

    One fused pass through `torch.quantize_per_tensor`, whose storage is then read as plain uint8
    (no copy); the same formula in plain ops where that kernel is gone (it is deprecated)."""
    quantize = getattr(torch, "quantize_per_tensor", None)
    if quantize is None:
        return _rounded_to_uint8(x.float(), scale, zero_point)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the quantized-tensor deprecation notice
        q = quantize(x.float(), scale, zero_point, torch.quint8)
    return torch.empty(0, dtype=torch.uint8, device=x.device).set_(
        q.untyped_storage(), q.storage_offset(), q.size(), q.stride())


def _widened(seen: tuple[float, float] | None, x: torch.Tensor) -> tuple[float, float]:
    low, high = (float(v) for v in torch.aminmax(x.float()))
    return (low, high) if seen is None else (min(seen[0], low), max(seen[1], high))


class _Observed(FastLinear):
    """Calibration: computes in float as before and records the range of its input (and of its
    output before GELU, for a GELU table)."""

    def dense(self, x: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
        self.calibration_range = _widened(getattr(self, "calibration_range", None), x)
        if not gelu:
            return super().dense(x, bias)
        out = super().dense(x, bias)
        self.pre_activation_range = _widened(getattr(self, "pre_activation_range", None), out)
        return F.gelu(out)


class Int8Linear(FastLinear):
    """A frozen linear layer in oneDNN's int8 kernel: uint8 input (quantized here from a float input
    with `input_qparams`, or already uint8 from the layer before), int8 weights, fp32 bias and output
    (uint8 in `output_qparams` when those are set)."""

    output_qparams: tuple[float, int] | None = None
    gelu_table: torch.Tensor | None = None  # GELU by table from the uint8 pre-activation (`gelu_by_table`)
    pre_activation_qparams: tuple[float, int] | None = None

    def quantize(self, input_range: tuple[float, float], reduce_range: bool) -> None:
        levels = 63 if reduce_range else 127
        weight = self.weight.detach().float()
        scale = (weight.abs().amax(dim=1) / levels).clamp(min=torch.finfo(torch.float32).tiny)
        weight = torch.round(weight / scale[:, None]).clamp(-levels, levels).to(torch.int8)
        self.int8_weight = torch.ops.onednn.qlinear_prepack(weight, None)
        self.weight_scale = scale.contiguous()
        self.weight_zero_point = torch.zeros_like(scale, dtype=torch.long)
        self.input_qparams = activation_qparams(*input_range)

    def dense(self, x: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
        if x.device.type != "cpu":
            raise PrecisionError(f"INT8 linears run on CPU (oneDNN); got a tensor on {x.device}")
        if x.dtype != torch.uint8:
            x = quantize_uint8(x, *self.input_qparams)
        operands = (x.reshape(-1, x.shape[-1]), self.input_qparams, self.int8_weight, self.weight_scale,
                    self.weight_zero_point, bias)
        if gelu and self.gelu_table is not None:
            out = native.byte_lookup(int8_linear(*operands, output_qparams=self.pre_activation_qparams),
                                     self.gelu_table)
        else:
            out = int8_linear(*operands, gelu=gelu, output_qparams=self.output_qparams)
        return out.view(*x.shape[:-1], out.shape[-1])

    def use_gelu_table(self, pre_activation_range: tuple[float, float]) -> None:
        """GELU by table into `output_qparams`, from a uint8 pre-activation over `pre_activation_range`
        (from `GELU_TABLE_LOW` up)."""
        low, high = pre_activation_range
        self.pre_activation_qparams = activation_qparams(max(low, GELU_TABLE_LOW), high)
        self.gelu_table = gelu_lookup_table(self.pre_activation_qparams, self.output_qparams)


def quantize_linears(fast: FastSwin, calibration: Iterable[torch.Tensor], *,
                     reduce_range: bool | None = None, table_gelu: bool | None = None) -> FastSwin:
    """Turn `fast`'s linears into `Int8Linear`s (in place; returns `fast`), calibrated on `calibration`:
    batches of images `[B, in_chans, H, W]` preprocessed as at eval time (e.g. `quantize.calibration_images`).
    The classifier head and layers the forward never calls (v2's CPB MLP, folded at freeze) stay float.
    `reduce_range`: 7-bit weights; default where oneDNN's int8 kernels saturate (`int16_saturation`: no VNNI).
    `table_gelu`: the MLP's GELU by table between fc1 and fc2; default `gelu_by_table()`.
    Raises `PrecisionError` where oneDNN's int8 kernels are missing or `fast` is not on the CPU,
    ValueError for an empty `calibration`."""
    if not available():
        raise PrecisionError("INT8 inference needs PyTorch's oneDNN int8 kernels (torch.ops.onednn.qlinear_pointwise),"
                             " which this build lacks; use `swinkit quantize` (ONNX Runtime)")
    device = next(fast.parameters()).device
    if device.type != "cpu":
        raise PrecisionError(f"INT8 inference runs on CPU (oneDNN's int8 kernels); the model is on {device}")
    if reduce_range is None:
        reduce_range = int16_saturation()
    if table_gelu is None:
        table_gelu = gelu_by_table()
    head = fast.model.head.fc
    layers = [m for m in fast.model.modules() if isinstance(m, FastLinear) and m is not head]
    for layer in layers:
        specialise(layer, _Observed).calibration_range = None
    images = 0
    try:
        with torch.inference_mode():
            for batch in calibration:
                fast(batch.to(device))
                images += len(batch)
    finally:
        ranges = {layer: layer.__dict__.pop("calibration_range", None) for layer in layers}
        pre_activation = {layer: layer.__dict__.pop("pre_activation_range", None) for layer in layers}
        for layer in layers:
            specialise(layer, FastLinear)
    if images == 0:
        raise ValueError("INT8 calibration needs at least one image; the calibration set was empty")
    for layer, seen in ranges.items():
        if seen is not None:
            specialise(layer, Int8Linear).quantize(seen, reduce_range)
    for mlp in fast.model.modules():  # fc1 writes uint8 in exactly the range fc2 reads
        if isinstance(mlp, FastMlp) and isinstance(mlp.fc1, Int8Linear) and isinstance(mlp.fc2, Int8Linear):
            mlp.fc1.output_qparams = mlp.fc2.input_qparams
            if table_gelu and pre_activation[mlp.fc1] is not None:
                mlp.fc1.use_gelu_table(pre_activation[mlp.fc1])
    quantized = sum(isinstance(layer, Int8Linear) for layer in layers)
    log.info("INT8: %d linears quantized on %d calibration images (%s weights, GELU %s)", quantized, images,
             "7-bit" if reduce_range else "8-bit", "by table" if table_gelu else "fused")
    return fast


def is_int8(module: torch.nn.Module) -> bool:
    """Whether any linear of `module` runs in INT8."""
    return any(isinstance(m, Int8Linear) for m in module.modules())
