"""What a benchmark ran on: CPU model and instruction flags, threads, torch version, load, and the
machine's measured GEMM peak per dtype on the model's own linear shapes (`measure_peaks`), which
every `swinkit bench` table states and measures its rows against."""
from __future__ import annotations

import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .. import onednn
from ..precision import BF16_UNITS, cpu_info


def cpu_name() -> str:
    """The CPU model string (Linux /proc/cpuinfo, else platform.processor())."""
    return cpu_info()[0] or platform.processor() or platform.machine() or "unknown CPU"


def load_average() -> float | None:
    """The 1-minute load average, where the OS has one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


# Environment variables that make the libraries use fewer instruction sets than the CPU has: a run with
# `ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 SWINKIT_NATIVE_MARCH=x86-64-v3`
# measures an AVX2-only CPU's code paths on an AVX-512 one. ONNX Runtime has no such switch;
# `scripts/emulate_cpu.sh avx2 CMD` (SWINKIT_EMULATED_CPU) masks CPUID itself, for every library.
ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY", "SWINKIT_NATIVE_MARCH",
              "SWINKIT_EMULATED_CPU")


def isa_limits() -> dict[str, str]:
    """The `ISA_LIMITS` variables set in this process, {name: value}."""
    return {name: os.environ[name] for name in ISA_LIMITS if os.environ.get(name)}


def format_isa_limits(limits: dict[str, str] | None) -> str:
    """A header line for a run with instruction sets limited ("" without limits)."""
    if not limits:
        return ""
    line = "instruction sets limited: " + " ".join(f"{name}={value}" for name, value in limits.items())
    if "SWINKIT_EMULATED_CPU" in limits:
        return line + (f" (CPUID masked by scripts/emulate_cpu.sh: every library, ONNX Runtime included, runs "
                       f"its {limits['SWINKIT_EMULATED_CPU']} code; the cores, caches and clocks are this CPU's)")
    return line + " (ONNX Runtime cannot be limited: its rows and the int8 peak's MatMulInteger use the whole CPU)"


def machine_info(device: str = "cpu") -> dict:
    """{cpu, cpu_capability, bf16_units, threads, torch, load_average, isa_limits} (+ gpu on CUDA)."""
    flags = cpu_info()[1]
    info = {"cpu": cpu_name(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_units": sorted(flags & BF16_UNITS),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "load_average": load_average(),
            "isa_limits": isa_limits()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ------------------------------------------------------------------------------------------ GEMM peaks
PEAK_DTYPES = ("fp32", "bf16", "int8")
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class GemmShape:
    """The forward matmul of one linear layer, `[rows, in_features] x [in_features, out_features]`,
    run `count` times per forward pass (same shape in several blocks); `layer` names the modules."""

    rows: int
    in_features: int
    out_features: int
    count: int = 1
    layer: str = ""

    @property
    def flops(self) -> int:
        """FLOPs of all `count` calls (2 x multiply-accumulates)."""
        return 2 * self.rows * self.in_features * self.out_features * self.count


class _LinearCalls(TorchFunctionMode):
    """Records `F.linear` calls as (layer name, rows, in, out); the layer is the `nn.Linear` whose weight it
    is (a module may call `F.linear` on its weight itself, as window attention does for qkv)."""

    def __init__(self, names: dict[int, str]):
        super().__init__()
        self.names, self.calls = names, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            out_features, in_features = weight.shape
            self.calls.append((self.names.get(id(weight), "linear"), x.numel() // in_features, in_features,
                               out_features))
        return func(*args, **(kwargs or {}))


def linear_shapes(model: nn.Module, batch: int, img_size: int | tuple[int, int] | None = None,
                  in_chans: int | None = None) -> list[GemmShape]:
    """The GEMMs of `model`'s linear layers in one forward pass at `batch` images (qkv, proj, fc1, fc2 per
    stage, patch merging, head), read from the model: every `F.linear` it calls at batch 1 and 2 (eval
    mode, no grad). Rows that do not grow with the batch (v2's position-bias MLP, precomputable) are left
    out, as `models.swin.macs` leaves them out. Calls with the same (rows, in, out) are merged; layer
    names show block indices as `*`. The model's mode is restored."""
    config = model.config
    img_size = img_size or config.img_size
    height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    in_chans = in_chans or config.in_chans
    names = {id(module.weight): re.sub(r"\.(\d+)(?=\.)", ".*", name)
             for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    calls = {}
    was_training = model.training
    model.eval()
    try:
        for images in (1, 2):
            with torch.no_grad(), _LinearCalls(names) as recorder:
                model(torch.zeros(images, in_chans, height, width, device=next(model.parameters()).device))
            calls[images] = recorder.calls
    finally:
        model.train(was_training)
    merged: dict[tuple[int, int, int], GemmShape] = {}
    for (layer, one, k, n), (_, two, _, _) in zip(calls[1], calls[2]):
        per_image = two - one
        if per_image <= 0:
            continue
        key = (per_image * batch, k, n)
        known = merged.get(key)
        label = layer if known is None or layer in known.layer.split(", ") else f"{known.layer}, {layer}"
        merged[key] = GemmShape(*key, count=(known.count if known else 0) + 1, layer=label)
    return list(merged.values())


def _best_seconds(fn, repeats: int, max_seconds: float) -> float:
    """Best time of up to `repeats` calls after one untimed call; stops early past `max_seconds` timed."""
    fn()
    times: list[float] = []
    while len(times) < repeats and sum(times) < max_seconds:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _onnxruntime_int8(in_features: int, out_features: int, weight: torch.Tensor):
    """An ONNX Runtime session of one MatMulInteger (u8 activations `[m, K]` x s8 weights `[K, N]` -> int32),
    the kernel of an INT8 model's linears; threads as torch's. None without onnx/onnxruntime."""
    try:
        import onnxruntime
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w"], ["y"])], "int8_gemm",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, ["rows", in_features])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["rows", out_features])],
        [numpy_helper.from_array(weight.numpy(), "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    # swinkit's options: the session's threads stop spinning when a run returns, so they do not slow
    # down the engine timed after it
    from ..infer.onnx_runner import session_options
    return onnxruntime.InferenceSession(proto.SerializeToString(), session_options(torch.get_num_threads()),
                                        providers=["CPUExecutionProvider"])


def _operands(dtype: str, shapes: Sequence[GemmShape]) -> tuple[torch.Tensor, ...]:
    """Flat random buffers that every shape's activations and weights are views of (drawing them per shape
    would take as long as the GEMMs): (activations, weights) and for int8 also the u8 activations."""
    generator = torch.Generator().manual_seed(0)
    inputs = max(s.rows * s.in_features for s in shapes)
    weights = max(s.in_features * s.out_features for s in shapes)
    if dtype == "int8":
        return (torch.randint(-128, 128, (inputs,), dtype=torch.int8, generator=generator),
                torch.randint(-128, 128, (weights,), dtype=torch.int8, generator=generator),
                torch.randint(0, 256, (inputs,), dtype=torch.uint8, generator=generator))
    return tuple(torch.rand(n, generator=generator).sub_(0.5).to(_TORCH_DTYPES[dtype]) for n in (inputs, weights))


def _engines(dtype: str, shape: GemmShape, operands: tuple[torch.Tensor, ...]) -> dict[str, Callable[[], object]]:
    """name -> a call computing `shape`'s product in `dtype`, for every engine that runs here."""
    rows, k, n = shape.rows, shape.in_features, shape.out_features
    x = operands[0][:rows * k].view(rows, k)
    if dtype == "int8":
        weight = operands[1][:k * n].view(k, n)
        engines: dict[str, Callable[[], object]] = {"torch._int_mm": lambda: torch._int_mm(x, weight)}
        session = _onnxruntime_int8(k, n, weight)
        x_u8 = operands[2][:rows * k].view(rows, k)
        if session is not None:
            feed = {"x": x_u8.numpy()}
            engines["onnxruntime MatMulInteger"] = lambda: session.run(None, feed)
        from ..infer.int8 import available, int8_linear
        if available():  # oneDNN's int8 linear as `infer.int8.Int8Linear` calls it (fp32 output)
            packed = torch.ops.onednn.qlinear_prepack(operands[1][:n * k].view(n, k), None)
            scales, zeros = torch.ones(n), torch.zeros(n, dtype=torch.long)
            engines["onednn qlinear"] = lambda: int8_linear(x_u8, (1.0, 0), packed, scales, zeros)
        return engines
    weight = operands[1][:n * k].view(n, k)  # nn.Linear's [out, in]
    weight_t = weight.t().contiguous()
    engines = {"torch.mm": lambda: torch.mm(x, weight_t)}
    if torch.backends.mkldnn.is_available() and (dtype != "bf16" or torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        engines["onednn"] = lambda: onednn.inner_product(x, weight)
        reordered = onednn.reorder_weight(weight)  # as the fast path keeps its weights (`onednn.linear(frozen=True)`)
        engines["onednn reordered"] = lambda: onednn.inner_product(x, reordered)
    return engines


def measure_peaks(shapes: Sequence[GemmShape], dtypes: Sequence[str] = PEAK_DTYPES, *, repeats: int = 3,
                  max_seconds: float = 0.1, previous: dict | None = None) -> dict:
    """THE machine peak of the benchmarks: GFLOP/s of the model's own GEMMs (`linear_shapes`) per dtype, on
    the CPU with torch's current threads. Every shape runs on every engine (fp32 and bf16: `torch.mm`, i.e.
    MKL, and oneDNN's inner product as `swinkit.onednn` calls it, on the plain weight and on the weight
    reordered once to oneDNN's layout; int8, u8/s8 with int32 accumulation:
    `torch._int_mm`, oneDNN's int8 linear as `infer.int8` calls it (fp32 output) and ONNX Runtime's
    MatMulInteger where installed), best of `repeats` calls after a
    warm-up (fewer once `max_seconds` are spent: large shapes vary little); a shape's rate is its fastest
    engine's. The dtype's peak weights the shapes by their FLOPs: the model's GEMM
    FLOPs over the time they take at those rates. `previous`: an earlier result for the same shapes;
    every engine then keeps the better of its two rates per shape, so a peak sampled at two moments
    (a shared machine's speed drifts) is the best the machine showed at either. Returns

        {"peak_gflops": {dtype: GFLOP/s or None}, "engines": {dtype: {engine: share of FLOPs it was fastest on}},
         "unavailable": {dtype: reason}, "shapes": [{layer, rows, in, out, count, gflop, dtype: {engine: GFLOP/s}}]}
    """
    unknown = sorted(set(dtypes) - set(PEAK_DTYPES))
    if unknown or not shapes:
        raise ValueError(f"measure_peaks needs shapes and dtypes from {PEAK_DTYPES}, got {len(shapes)} shapes, "
                         f"dtypes {list(dtypes)}")
    table = [{"layer": s.layer, "rows": s.rows, "in": s.in_features, "out": s.out_features, "count": s.count,
              "gflop": round(s.flops / 1e9, 4)} for s in shapes]
    result: dict = {"peak_gflops": {}, "engines": {}, "unavailable": {}, "shapes": table}
    previous_rows = (previous or {}).get("shapes")
    if previous_rows is not None and [(r["rows"], r["in"], r["out"]) for r in previous_rows] != [
            (r["rows"], r["in"], r["out"]) for r in table]:
        raise ValueError("measure_peaks: `previous` was measured on other shapes")
    with torch.inference_mode():
        for dtype in dtypes:
            seconds, wins, failures, complete = 0.0, {}, [], True
            operands = _operands(dtype, shapes)
            for index, (shape, row) in enumerate(zip(shapes, table)):
                rates = {}
                for engine, call in _engines(dtype, shape, operands).items():
                    try:
                        rates[engine] = shape.flops / shape.count / _best_seconds(call, repeats, max_seconds)
                    except Exception as error:  # an engine that cannot run this shape here is left out
                        failures.append(f"{engine}: {type(error).__name__}: {error}")
                earlier = (previous_rows[index].get(dtype) or {}) if previous_rows else {}
                for engine, gflops in earlier.items():
                    rates[engine] = max(rates.get(engine, 0.0), gflops * 1e9)
                row[dtype] = {engine: round(rate / 1e9, 1) for engine, rate in rates.items()}
                if not rates:
                    complete = False
                    break
                best = max(rates, key=rates.get)
                seconds += shape.flops / rates[best]
                wins[best] = wins.get(best, 0) + shape.flops
            if not complete:
                result["peak_gflops"][dtype] = None
                result["unavailable"][dtype] = "; ".join(failures[:2]) or "no engine"
                continue
            total = sum(wins.values())
            result["peak_gflops"][dtype] = round(total / seconds / 1e9, 1)
            result["engines"][dtype] = {engine: round(flops / total, 3) for engine, flops in
                                        sorted(wins.items(), key=lambda item: -item[1])}
    return result


def row_dtype(amp: bool = False, int8: bool = False) -> str:
    """The peak a benchmark row is measured against: int8 rows int8's, autocast (bf16 on the CPU) bf16's."""
    return "int8" if int8 else "bf16" if amp else "fp32"


def peak_fields(gflops: float | None, dtype: str, peaks: dict | None) -> dict:
    """A row's achieved GFLOP/s against the peak of its dtype, from `measure_peaks` at the row's batch:
    {dtype, gflops, peak_gflops, pct_peak, gemm_peaks_gflops (every dtype's peak, as the table's header)}."""
    measured = (peaks or {}).get("peak_gflops", {})
    peak = measured.get(dtype)
    return {"dtype": dtype, "gflops": None if gflops is None else round(gflops, 3), "peak_gflops": peak,
            "pct_peak": round(100 * gflops / peak, 1) if gflops is not None and peak else None,
            "gemm_peaks_gflops": dict(measured) or None}


def format_peaks(peaks: dict, where: str = "") -> str:
    """One table header line: every dtype's measured peak and the engines that set it."""
    parts = []
    for dtype, value in peaks["peak_gflops"].items():
        if value is None:
            parts.append(f"{dtype} - ({peaks['unavailable'].get(dtype)})")
            continue
        engines = peaks["engines"][dtype]
        by = (next(iter(engines)) if len(engines) == 1 else
              ", ".join(f"{engine} {100 * share:.0f}%" for engine, share in engines.items()))
        parts.append(f"{dtype} {value:.0f} ({by})")
    shapes = peaks["shapes"]
    return (f"GEMM peak GFLOP/s{where}, measured now on the model's {len(shapes)} linear shapes "
            f"(FLOP-weighted best engine per shape): " + ", ".join(parts))
