"""The matmuls of a linear layer on oneDNN, for large CPU problems; used by the training policy
(`train.lean`) and the fast inference path (`infer.fast`). The model itself uses `nn.Linear`.

A Swin step is ~75% matmuls: per linear layer the forward `x W^T`, the input gradient `g W`
and the weight gradient `g^T x`. PyTorch runs fp32 `mm` on CPU through MKL's sgemm; oneDNN is
up to twice as fast for these tall-skinny shapes on some CPUs (`scripts/gemm_bench.py` measures
it). PyTorch does not route `mm` to oneDNN, so this module calls it directly:

- forward and input gradient: oneDNN's inner product (`mkldnn._linear_pointwise`, the forward
  optionally with GELU fused);
- weight gradient: the weight gradient of a 1x1 convolution over the rows viewed as a
  channels-last image, which oneDNN computes from `g` and `x` as they lie in memory.

Inference (`linear(..., frozen=True)`, the fast path) hands oneDNN each weight reordered once to its
blocked layout (`reorder_weight`) instead of reordering inside every call: at batch 1 that measured
~5% faster for Swin-T in bf16 (9% with oneDNN forced on every shape), within noise in fp32
(interleaved medians of 81 calls).

Accumulation is fp32, like MKL; only the summation order differs. `uses_onednn` is the one rule
deciding when these run.

Which library is faster depends on the CPU and the shape: on one AMD EPYC kind oneDNN runs these
fp32 GEMMs ~2x MKL, on a Zen 4 kind they are equal, on an AMX Xeon MKL wins most backward shapes
by 15-30% (`scripts/gemm_bench.py`). So where both can run, the choice is measured, not assumed
(`engine`): the first time a shape is met, both libraries compute it on random operands of that
shape (rows capped at `MEASURE_ROWS`, alternating for `REPEATS` rounds after a warm-up) and the one
with the shorter median time runs it from then on. The frozen forward of inference is not measured:
it is oneDNN's wherever oneDNN runs (`FIXED`). Its weight is reordered once for oneDNN, while MKL's
sgemm packs the weight again in every call, and timing the two on hot operands misleads: choices
measured per shape (best of three calls, or median of seven with a 5% preference for oneDNN; one
in five decisions flipped between repeats) ran Swin-T's fast path slower than oneDNN on every shape,
~7-10% at batch 1 (26 and 28 of 31 alternating whole-model rounds), level at batch 8 (Intel Xeon
without AMX; on the AMD kinds oneDNN is as fast as MKL or ~2x). The choices are kept in a JSON file
per machine, torch version and thread count (`choices_path`, under `$SWINKIT_CACHE_DIR` or
`~/.cache/swinkit`), so every later process on the machine, a resumed training run included, makes
the same ones and computes bit-identical results. `SWINKIT_GEMM_ENGINE=onednn|torch` forces one
library (no measuring, nothing written).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from .files import atomic_write, cache_folder
from .models.layers import tracing
from .precision import cpu_info

log = logging.getLogger("swinkit")

MIN_MACS = 1 << 24  # below this, call overhead outweighs the faster kernel
# dtypes oneDNN runs per operation: bf16 forwards are oneDNN's (AMX/AVX512-BF16 kernels); the
# bf16 weight gradient through the convolution trick measured slower than `mm`, so it stays fp32.
DTYPES = {"forward": (torch.float32, torch.bfloat16), "forward_frozen": (torch.float32, torch.bfloat16),
          "grad_input": (torch.float32,), "grad_weight": (torch.float32,)}


def uses_onednn(op: str, rows: int, in_features: int, out_features: int, *tensors: torch.Tensor,
                gelu: bool = False) -> bool:
    """THE rule: oneDNN runs `op` ("forward", "forward_frozen", "grad_input", "grad_weight") of a linear
    layer `[rows, in] x [in, out]` when the problem is large, every tensor is on the CPU in a dtype oneDNN
    runs for that op, oneDNN is available, no tracer/exporter is running (they must see plain ops), and it
    is the faster library for this shape here (`engine`)."""
    dtypes = DTYPES[op]
    if torch.jit.is_tracing():  # sizes are tensors there; the tracer must see plain ops
        return False
    return (rows * in_features * out_features >= MIN_MACS  # first: small problems stop here
            and all(t.device.type == "cpu" and t.dtype in dtypes for t in tensors)
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and (tensors[0].dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported())
            and not tracing()
            and engine(op, rows, in_features, out_features, tensors[0].dtype, gelu) == "onednn")


def inner_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False
                  ) -> torch.Tensor:
    """oneDNN's inner product `x @ weight.T + bias` (GELU fused when `gelu`), whatever the size; x: `[..., K]`
    contiguous, weight: `[N, K]`. `linear` decides when to call it; the benchmarks' peak times it directly."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none" if gelu else "")


def reorder_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` `[N, K]` (fp32/bf16) in oneDNN's own blocked layout (an opaque mkldnn tensor), which
    `inner_product` takes in its place: reordered once rather than inside every call."""
    return torch.ops.mkldnn._reorder_linear_weight(weight)


_reordered = WeakIdKeyDictionary()  # weight -> ((data_ptr, dtype, version), reordered); by identity, not ==


def _frozen_weight(weight: torch.Tensor) -> torch.Tensor:
    """`reorder_weight(weight)`, kept while `weight` lives and is unchanged (same storage, dtype and
    version: an in-place edit or a move reorders again; inference-mode tensors have no version).
    Kept beside the module, not in it, so the module still copies, moves and saves as plain tensors."""
    key = (weight.data_ptr(), weight.dtype, None if weight.is_inference() else weight._version)
    kept = _reordered.get(weight)
    if kept is None or kept[0] != key:
        kept = _reordered[weight] = (key, reorder_weight(weight))
    return kept[1]


# Each op in both libraries, on 2-D operands: what runs, and what `engine` times.
def _forward_torch(x, weight, bias, gelu):
    out = F.linear(x, weight, bias)
    return F.gelu(out) if gelu else out


def _forward_onednn(x, weight, bias, gelu):
    return inner_product(x.contiguous(), weight, bias, gelu)


def _forward_frozen_onednn(x, weight, bias, gelu):
    return inner_product(x.contiguous(), _frozen_weight(weight), bias, gelu)


def _grad_input_torch(grad_2d, weight):
    return grad_2d.mm(weight)


def _grad_input_onednn(grad_2d, weight):
    return inner_product(grad_2d.contiguous(), weight.t().contiguous())


def _grad_weight_torch(grad_2d, x_2d):
    return grad_2d.t().mm(x_2d)


def _grad_weight_onednn(grad_2d, x_2d):
    # Rows as the height of a 1 x rows x 1 channels-last image: `x` holds C=K channels, the
    # output gradient C=N; the 1x1 kernel's gradient [N, K, 1, 1] is exactly grad^T x.
    rows, in_features, out_features = x_2d.shape[0], x_2d.shape[1], grad_2d.shape[1]
    image = x_2d.contiguous().view(1, rows, 1, in_features).permute(0, 3, 1, 2)
    grad_image = grad_2d.contiguous().view(1, rows, 1, out_features).permute(0, 3, 1, 2)
    kernel = x_2d.new_empty(out_features, in_features, 1, 1).to(memory_format=torch.channels_last)
    _, grad_kernel, _ = torch.ops.aten.convolution_backward(
        grad_image, image, kernel, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False])
    return grad_kernel.view(out_features, in_features)


_OPS: dict[str, dict[str, Callable]] = {
    "forward": {"torch": _forward_torch, "onednn": _forward_onednn},
    "forward_frozen": {"torch": _forward_torch, "onednn": _forward_frozen_onednn},
    "grad_input": {"torch": _grad_input_torch, "onednn": _grad_input_onednn},
    "grad_weight": {"torch": _grad_weight_torch, "onednn": _grad_weight_onednn},
}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False,
           frozen: bool = False) -> torch.Tensor:
    """`x @ weight.T + bias` (GELU applied when `gelu`), no autograd of its own. x: `[..., K]`, weight: `[N, K]`.
    `frozen`: the weight will not change (inference), so oneDNN gets it reordered once, kept while it lives
    (`reorder_weight`), and the library for the shape is measured with it so ("forward_frozen")."""
    out_features, in_features = weight.shape
    op = "forward_frozen" if frozen else "forward"
    if not uses_onednn(op, x.numel() // in_features, in_features, out_features, x, weight, gelu=gelu):
        return _forward_torch(x, weight, bias, gelu)
    return _OPS[op]["onednn"](x, weight, bias, gelu)


def grad_input(grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`grad_out @ weight`: the gradient of `linear` w.r.t. its input."""
    out_features, in_features = weight.shape
    rows = grad_out.numel() // out_features
    if not uses_onednn("grad_input", rows, in_features, out_features, grad_out, weight):
        return grad_out.matmul(weight)
    return _grad_input_onednn(grad_out.reshape(rows, out_features), weight).view(*grad_out.shape[:-1], in_features)


def grad_weight(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`grad_out^T @ x` summed over all leading dims: the gradient of `linear` w.r.t. its weight."""
    out_features, in_features = grad_out.shape[-1], x.shape[-1]
    rows = x.numel() // in_features
    grad_2d, x_2d = grad_out.reshape(rows, out_features), x.reshape(rows, in_features)
    if not uses_onednn("grad_weight", rows, in_features, out_features, grad_out, x):
        return _grad_weight_torch(grad_2d, x_2d)
    return _grad_weight_onednn(grad_2d, x_2d)


# ------------------------------------------------------------------- which library runs a shape
ENGINE_ENV = "SWINKIT_GEMM_ENGINE"  # measure (default) | onednn | torch
ENGINE_MODES = ("measure", "onednn", "torch")
MEASURE_ROWS = 1 << 15  # tall-skinny GEMMs run at their large-problem rate well before this
REPEATS = 7
FIXED = {"forward_frozen": "onednn"}  # ops whose library is not measured (see the module docstring)
CHOICE_RULE = 2  # part of the choices file's name: choices made by an earlier rule are measured afresh
_tables: dict[Path, dict[str, str]] = {}


def choices_path() -> Path:
    """The JSON file of measured choices for this machine (CPU model and flags), torch version and
    thread count, in `files.cache_folder()`: a change of any of them measures afresh."""
    return _choices_path(cache_folder(), torch.get_num_threads())


@functools.lru_cache(maxsize=16)
def _choices_path(folder: Path, threads: int) -> Path:
    name, flags = cpu_info()
    machine = json.dumps([name, sorted(flags), torch.__version__, threads, CHOICE_RULE])
    return Path(folder) / f"gemm-engines-{hashlib.sha256(machine.encode()).hexdigest()[:16]}.json"


def _read_choices(path: Path) -> dict[str, str]:
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:  # unreadable or half-foreign: measure again, say so
        log.warning("GEMM engine choices %s unreadable (%s); measuring again", path, error)
        return {}
    choices = table.get("choices") if isinstance(table, dict) else None
    if not isinstance(choices, dict):
        log.warning("GEMM engine choices %s have no 'choices' table; measuring again", path)
        return {}
    return {k: v for k, v in choices.items() if isinstance(k, str) and v in _OPS["forward"]}


def _save_choices(path: Path, choices: dict[str, str]) -> None:
    merged = {**_read_choices(path), **choices}  # keep what other processes measured meanwhile
    text = json.dumps({"machine": cpu_info()[0], "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "choices": dict(sorted(merged.items()))}, indent=1)
    try:
        atomic_write(path, lambda tmp: tmp.write_text(text))
    except OSError as error:  # a read-only home still trains; choices then last for this process
        log.warning("could not keep GEMM engine choices (%s); they hold for this process only", error)


def _seconds(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def measure_engine(op: str, rows: int, in_features: int, out_features: int, dtype: torch.dtype,
                   gelu: bool = False) -> str:
    """"onednn" or "torch": the library that computes `op` of this shape faster here, timed on random
    operands (both alternately, `REPEATS` rounds after a warm-up, compared by their median times)."""
    generator = torch.Generator().manual_seed(0)
    def rand(*shape):
        return torch.rand(*shape, generator=generator).sub_(0.5).to(dtype)
    weight = rand(out_features, in_features)
    if op in ("forward", "forward_frozen"):
        args = (rand(rows, in_features), weight, rand(out_features), gelu)
    elif op == "grad_input":
        args = (rand(rows, out_features), weight)
    else:
        args = (rand(rows, out_features), rand(rows, in_features))
    times: dict[str, list[float]] = {name: [] for name in _OPS[op]}
    with torch.no_grad():
        for repeat in range(REPEATS + 1):
            for name, fn in _OPS[op].items():
                seconds = _seconds(lambda: fn(*args))
                if repeat:
                    times[name].append(seconds)
    median = {name: statistics.median(values) for name, values in times.items()}
    return min(median, key=median.get)


def engine(op: str, rows: int, in_features: int, out_features: int, dtype: torch.dtype, gelu: bool = False) -> str:
    """Which library runs `op` at this shape: `SWINKIT_GEMM_ENGINE` when it names one, else `FIXED`'s
    library for `op`, else the measured choice for the shape's row bucket (the largest power of two <= rows,
    at most `MEASURE_ROWS`), measured on first use and kept in `choices_path()`."""
    mode = os.environ.get(ENGINE_ENV, "measure") or "measure"
    if mode != "measure":
        if mode not in ENGINE_MODES:
            raise ValueError(f"{ENGINE_ENV}={mode!r}: choose one of {', '.join(ENGINE_MODES)}")
        return mode
    if op in FIXED:
        return FIXED[op]
    bucket = min(1 << (max(rows, 1).bit_length() - 1), MEASURE_ROWS)
    key = f"{op} {str(dtype).removeprefix('torch.')}{' gelu' if gelu else ''} {bucket}x{in_features}x{out_features}"
    path = choices_path()
    table = _tables.get(path)
    if table is None:
        table = _tables[path] = _read_choices(path)
    choice = table.get(key)
    if choice is None:
        choice = table[key] = measure_engine(op, bucket, in_features, out_features, dtype, gelu)
        log.debug("GEMM %s: %s (measured)", key, choice)
        _save_choices(path, table)
    return choice


def linear_grads(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor):
    """Gradients of `x @ weight.T + bias` w.r.t. x, weight and bias."""
    grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return grad_input(grad_out, weight), grad_weight(grad_out, x), grad_bias


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_input(grad_out, weight) if ctx.needs_input_grad[0] else None
        grad_w = grad_weight(grad_out, x) if ctx.needs_input_grad[1] else None
        grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear_autograd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` with all three matmuls on oneDNN where `uses_onednn` allows (its own autograd while
    autograd records, plain `linear` otherwise). Under autocast or a tracer: `F.linear`."""
    if torch.is_autocast_enabled(x.device.type) or tracing():
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        # 2-D inside the Function: its output must not be a view (in-place ops may follow it)
        out = _Linear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])
    return linear(x, weight, bias)


class OneDNNLinear:
    """Mixin for an `nn.Linear`: computed by `linear_autograd` (installed by `swinkit.policy.specialise`;
    parameters and state-dict keys stay those of the `nn.Linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_autograd(x, self.weight, self.bias)
