"""Precision names -> torch dtypes: the one table that training, inference and benchmarks read.

    fp32         float32 throughout
    bf16-mixed   autocast to bfloat16; weights, optimizer state and loss stay float32
    fp16-mixed   autocast to float16, with loss scaling (the trainer's GradScaler)
    amp          the mixed precision the device does best (`amp_dtype`): what benchmarks measure
    auto         bf16-mixed where bf16 matmuls run faster than fp32 on the device (`has_fast_bf16`: bf16
                 units, and on the CPU a measured bf16 GEMM rate at least `BF16_MIN_SPEEDUP` x fp32's),
                 else fp32: resolved once when training starts (`resolve`), so config.yaml names what ran

"bf16", "fp16" and "float32" are accepted for "bf16-mixed", "fp16-mixed" and "fp32".

Inference (`INFERENCE_PRECISIONS`: fp32, bf16, fp16) casts the whole frozen model to one dtype
(`inference_dtype`); `slow_precision_note` says when the device lacks the units for it.
"""
from __future__ import annotations

import functools
from contextlib import nullcontext

import torch

from .errors import SwinkitError

PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed", "auto")  # what a training config may say
# CPU instruction sets with bf16 arithmetic (/proc/cpuinfo flags): without them bf16 matmuls convert
# to fp32 and run slower than fp32 itself.
BF16_UNITS = frozenset({"avx512_bf16", "amx_bf16", "amx_tile"})

_AUTOCAST_DTYPES = {"fp32": None, "float32": None, "bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16,
                    "fp16-mixed": torch.float16, "fp16": torch.float16}


@functools.lru_cache(maxsize=1)
def cpu_info() -> tuple[str | None, frozenset[str]]:
    """(model name, instruction-set flags) of the CPU from Linux /proc/cpuinfo; (None, empty) elsewhere.
    The one reader: precision rules, the INT8 scheme and the benchmarks' machine line use it."""
    name, flags = None, frozenset()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if name is None and line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif not flags and line.startswith(("flags", "Features")):
                    flags = frozenset(line.split(":", 1)[1].split())
                if name is not None and flags:
                    break
    except OSError:
        pass
    return name, flags


def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags (Linux /proc/cpuinfo; empty elsewhere)."""
    return cpu_info()[1]


# The flags alone do not decide: a Xeon that exposes AVX512-BF16 but not AMX (a VM here, 2 threads)
# ran oneDNN's bf16 GEMMs at 0.6-0.7x its fp32 ones on Swin's shapes, where an AMX one ran them ~2-4x.
BF16_MIN_SPEEDUP = 1.15
BF16_PROBE = (1024, 384, 1536)  # rows x in x out: a stage-3 MLP GEMM of Swin-T at batch 8 (rows cut)


def cpu_bf16_speedup() -> float | None:
    """How much faster a bf16 matmul (oneDNN's, which autocast and bf16 inference run) is than an fp32 one on
    this CPU at torch's current thread count, on `BF16_PROBE`: fp32 median time over bf16 median time of 7
    alternating `torch.mm` calls after a warm-up, into outputs allocated once (a process that returns freed
    memory to the OS would otherwise time page faults, twice as many for fp32: measured 0.8-2.0x inside
    `swinkit train` where the same GEMMs run 0.5-0.75x). Measured once per process and thread count
    (~0.1 s). None where oneDNN has no bf16 kernels."""
    return _bf16_speedup(torch.get_num_threads())


@functools.lru_cache(maxsize=4)
def _bf16_speedup(threads: int) -> float | None:  # threads: the cache key (the probe runs at torch's count)
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return None
    import statistics
    import time

    rows, in_features, out_features = BF16_PROBE
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(rows, in_features, generator=generator).sub_(0.5)
    weight = torch.rand(in_features, out_features, generator=generator).sub_(0.5)
    calls = {dtype: (x.to(dtype), weight.to(dtype), torch.empty(rows, out_features, dtype=dtype))
             for dtype in (torch.float32, torch.bfloat16)}
    times: dict[torch.dtype, list[float]] = {dtype: [] for dtype in calls}
    with torch.no_grad():
        for repeat in range(8):
            for dtype, (inputs, matrix, out) in calls.items():
                start = time.perf_counter()
                torch.mm(inputs, matrix, out=out)
                if repeat:
                    times[dtype].append(time.perf_counter() - start)
    return statistics.median(times[torch.float32]) / statistics.median(times[torch.bfloat16])


def has_fast_bf16(device: torch.device | str) -> bool:
    """Whether bf16 matmuls run faster than fp32 on `device`: a CUDA GPU that supports bf16, or a CPU with
    bf16 units (`BF16_UNITS`) whose bf16 GEMMs measured at least `BF16_MIN_SPEEDUP` x fp32 (`cpu_bf16_speedup`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not cpu_flags() & BF16_UNITS or not (
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    speedup = cpu_bf16_speedup()
    return speedup is not None and speedup >= BF16_MIN_SPEEDUP


def resolve(precision: str, device: torch.device | str) -> str:
    """The precision a run uses: "auto" becomes "bf16-mixed" where `has_fast_bf16(device)`, else "fp32";
    any other name is returned as it is."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if has_fast_bf16(device) else "fp32"


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
    if precision == "auto":
        precision = resolve(precision, device)
    if precision not in _AUTOCAST_DTYPES:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return _AUTOCAST_DTYPES[precision]


def autocast(precision: str | None, device: torch.device | str):
    """`torch.autocast` for `precision` on `device`, or a no-op context for fp32."""
    device = torch.device(device)
    dtype = autocast_dtype(precision, device)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


# ------------------------------------------------------------------------------------------ inference
# Inference casts the whole frozen model (`optimize_for_inference(dtype=)`) instead of autocasting: no
# weights to keep in fp32, and the ops that need fp32 already take it (`attention_probs` promotes the
# scores and softmax; LayerNorm kernels accumulate bf16/fp16 input in fp32).
INFERENCE_PRECISIONS = ("fp32", "bf16", "fp16")  # what `swinkit eval/predict/export/bench infer --precision` take
INT8 = "int8"  # eval/predict/bench infer also take this: the linears in INT8, calibrated (`infer.int8`)
_INFERENCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FP16_UNITS = frozenset({"avx512_fp16", "amx_fp16"})  # CPU flags with fp16 arithmetic


class PrecisionError(SwinkitError, ValueError):
    """A precision that cannot be used here: an unknown name, or one a file or backend does not run."""


def inference_dtype(precision: str | torch.dtype | None) -> torch.dtype:
    """"fp32" / "bf16" / "fp16" (or one of those torch dtypes; None = fp32) -> the dtype inference runs in."""
    if precision is None:
        return torch.float32
    if isinstance(precision, torch.dtype) and precision in _INFERENCE_DTYPES.values():
        return precision
    if precision not in _INFERENCE_DTYPES:
        raise PrecisionError(f"precision {precision!r} is not one inference runs; choose from "
                             f"{', '.join(INFERENCE_PRECISIONS)}")
    return _INFERENCE_DTYPES[precision]


def inference_precision(dtype: torch.dtype) -> str:
    """The name of an inference dtype: torch.bfloat16 -> "bf16" (any other dtype: its torch name)."""
    return next((name for name, known in _INFERENCE_DTYPES.items() if known == dtype), str(dtype).split(".")[-1])


def slow_precision_note(dtype: torch.dtype, device: torch.device | str) -> str | None:
    """Why inference in `dtype` will be slow on `device`, or None: bf16 or fp16 on a CPU whose flags are
    known (Linux) and lack its units (`BF16_UNITS`, `FP16_UNITS`), bf16 on a GPU without bf16 support.
    It still runs: the arithmetic is converted, which usually makes it slower than fp32."""
    device = torch.device(device)
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    name = inference_precision(dtype)
    if device.type == "cuda":
        if dtype == torch.bfloat16 and not has_fast_bf16(device):
            return "bf16 on a GPU without bf16 support: it runs, emulated, usually slower than fp16 or fp32"
        return None
    flags = cpu_flags()
    if device.type != "cpu" or not flags:
        return None
    units = BF16_UNITS if dtype == torch.bfloat16 else FP16_UNITS
    if not flags & units:
        return (f"{name} on a CPU without {name.upper()} instructions ({', '.join(sorted(units))}): it runs, but the "
                f"matmuls convert to fp32 and it is usually slower than fp32")
    if dtype == torch.bfloat16:
        speedup = cpu_bf16_speedup()
        if speedup is not None and speedup < 1.0:
            return (f"bf16 on this CPU ({', '.join(sorted(flags & units))}): its bf16 GEMMs measured {speedup:.2f}x "
                    f"the speed of fp32 here, so bf16 runs slower than fp32")
    return None


# ------------------------------------------------------------------------------------------ denormals
# The shifted-window mask (-100, as in the official code and every peer) makes softmax return weights
# near 1e-44: denormal floats. On x86 every float op on a denormal takes a slow microcode path: measured
# on a 2-core AMX Xeon, attn @ v of Swin-T's masked windows 28x slower and their softmax 5x slower than
# with denormals flushed. Flushed (FTZ/DAZ), those weights are exactly 0 instead of ~1e-44: results
# differ below 1e-38, far inside every tolerance (fp32 resolution near 1 is 1e-7).
_denormals_flushed: bool | None = None  # what `flush_denormals` last set (None: never, the process default)


@functools.lru_cache(maxsize=1)
def _openmp_runtime():
    """The GNU-compatible OpenMP runtime torch runs its CPU threads on (libgomp, or Intel's libiomp5,
    which exports the same entry points), from this process's memory map (read once); None where there
    is none."""
    import ctypes
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "libgomp" in line or "libiomp5" in line})
    except OSError:
        return None
    for path in paths:
        try:
            runtime = ctypes.CDLL(path)
            runtime.GOMP_parallel  # noqa: B018 (raises AttributeError if absent)
            return runtime
        except (OSError, AttributeError):
            continue
    return None


def flush_denormals(enable: bool = True) -> bool:
    """Treat denormal floats as zero (x86 FTZ/DAZ) on this thread and on every thread of torch's OpenMP
    pool (`torch.set_flush_denormal` sets the calling thread only; the pool's threads are reached with one
    parallel region of the OpenMP runtime; threads created later inherit the setting). Returns True when
    all of them were set, False where the CPU has no DAZ or no OpenMP runtime was found (then only this
    thread and threads it starts later). The optimized inference path and the trainer call it
    (`ensure_denormals_flushed`); it is process-wide, like `torch.set_flush_denormal`."""
    global _denormals_flushed
    import ctypes
    if not torch.set_flush_denormal(enable):
        return False
    _denormals_flushed = enable
    runtime = _openmp_runtime()
    if runtime is None:
        return False
    callback_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    callback = callback_type(lambda _: torch.set_flush_denormal(enable))
    runtime.GOMP_parallel.argtypes = [callback_type, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    runtime.GOMP_parallel.restype = None
    runtime.GOMP_parallel(callback, None, max(torch.get_num_threads(), 1), 0)
    return True


def denormals_flushed() -> bool:
    """Whether `flush_denormals` last turned flushing on in this process."""
    return bool(_denormals_flushed)


def ensure_denormals_flushed() -> None:
    """`flush_denormals()` unless it already ran in this process (one cheap check per call after that).
    A caller who turned flushing off (`flush_denormals(False)`) is not overridden."""
    if _denormals_flushed is None:
        flush_denormals(True)
