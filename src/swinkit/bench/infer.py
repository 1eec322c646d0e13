"""`swinkit bench infer`: swinkit's inference engines against their peers, in one run.

For each batch size every engine gets `warmup` untimed calls, then `rounds` rounds in
which each engine runs once in turn (interleaved, so a noisy neighbour hurts all
alike); the reported time is the median over rounds. Engines:

    swinkit eager        the SwinTransformer in eval mode
    swinkit optimized    `optimize_for_inference(model)`; with `precisions` also "swinkit optimized bf16"
                         (and fp16): the same path cast to that dtype, fed the fp32 images (cast inside),
                         and "swinkit optimized int8": its linears in oneDNN's int8 kernels (`infer.int8`),
                         calibrated on `calib_dir` as the ONNX INT8 file is (skipped without one)
    swinkit onnxruntime  `export_onnx` (dynamic batch/H/W) in ONNX Runtime, all graph optimizations
    swinkit int8         `quantize` of that file (ONNX Runtime), calibrated on `calib_dir` (skipped without one)
    timm eager, timm jit.trace, torchvision, hf, timm onnxruntime   (peers; see `peers.py`)
    timm eager ftz, timm jit.trace ftz   (`timm-ftz`: timm with denormals flushed, as swinkit runs)

Each engine runs in its own float mode (`denormal_mode`): the optimized path and ONNX Runtime flush
denormals to zero (the shift mask's softmax weights, ~1e-44, are slow on x86 otherwise), the eager
model and the peers run in the process's default mode unless their row says "ftz".

glibc keeps freed memory for reuse (`allocator.keep_freed_memory`, which the optimized path turns on by
itself) for every engine, peers included: it is switched on before any engine is built, so no row
pays fresh zeroed pages for its large tensors while another does not (header "freed_memory_kept").

Speedups are against timm's `torch.jit.trace` (FasterTransformer's baseline), falling back
to timm eager, then to swinkit eager. For each batch size the machine's GEMM peaks are
measured in the same run on the model's own linear shapes at that batch (`machine.measure_peaks`:
fp32, bf16, int8), before the engines' rounds and again after them, each shape keeping the better
rate (a shared machine's speed drifts over minutes), and every row states its achieved GFLOP/s (the
model's FLOPs per image, `models.swin.flops_per_image`, times img/s) and its % of the peak of its
dtype (the INT8 engine's of the int8 peak, every other engine's of the fp32 peak).
"""
from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from .. import api
from ..allocator import keep_freed_memory
from ..infer.optimize import optimize_for_inference
from ..metadata import Preprocess, read_metadata
from ..precision import (INFERENCE_PRECISIONS, INT8, denormals_flushed, flush_denormals, inference_dtype,
                         slow_precision_note)
from ..models.swin import flops_per_image
from . import machine, peers

log = logging.getLogger("swinkit")

PEERS = ("timm", "torchvision", "hf", "onnxruntime", "timm-ftz")
SWINKIT_ENGINES = ("eager", "optimized", "onnxruntime", "int8")
ENGINE_ORDER = ("swinkit eager", "swinkit optimized", "swinkit optimized bf16", "swinkit optimized fp16",
                "swinkit optimized int8", "swinkit onnxruntime", "swinkit int8",
                "timm eager", "timm jit.trace", "timm eager ftz", "timm jit.trace ftz", "torchvision", "hf",
                "timm onnxruntime")
FLUSHED_PEERS = ("timm eager ftz", "timm jit.trace ftz")  # peers run with denormals flushed, as swinkit runs


def denormal_mode(label: str) -> str:
    """The float mode an engine runs in, as its library runs it: swinkit's optimized path flushes denormals
    (`precision.flush_denormals`), so do ONNX Runtime sessions (by their options, on their own threads);
    the eager model (the plain definition) and the peers run in the process's default mode, except the
    "... ftz" rows (`--compare timm-ftz`), which show what flushing gives timm."""
    if label in FLUSHED_PEERS:
        return "flush"
    return "flush" if label.startswith("swinkit") and label != "swinkit eager" else "default"


BASELINES = ("timm jit.trace", "timm eager", "swinkit eager")
INT8_ENGINES = ("swinkit int8", "swinkit optimized int8")  # rows measured against the int8 GEMM peak


def optimized_label(precision: str) -> str:
    """The engine name of the optimized path in `precision`: "swinkit optimized" (fp32), "swinkit optimized bf16"."""
    return "swinkit optimized" if precision == "fp32" else f"swinkit optimized {precision}"


# The comparisons the README's targets are stated in: (engine, against, what it says), img/s over img/s.
RATIOS = (("swinkit int8", "swinkit onnxruntime", "INT8 vs our FP32 in ONNX Runtime"),
          ("swinkit optimized int8", "swinkit onnxruntime", "PyTorch INT8 vs our FP32 in ONNX Runtime"),
          ("swinkit onnxruntime", "timm onnxruntime", "our ONNX vs timm's export, both in ONNX Runtime"),
          ("swinkit optimized", "timm jit.trace", "optimized vs timm jit.trace"),
          *((optimized_label(p), "swinkit optimized", f"{optimized_label(p)} vs fp32")
            for p in (*INFERENCE_PRECISIONS[1:], INT8)))


def ratios(rows: list[dict]) -> list[dict]:
    """`RATIOS` present in `rows`, per batch: {batch, engine, against, ratio (img/s over img/s), label}."""
    found = []
    for batch in sorted({row["batch"] for row in rows}):
        speed = {row["engine"]: row["img_s"] for row in rows if row["batch"] == batch}
        for engine, against, label in RATIOS:
            if engine in speed and against in speed:
                found.append({"batch": batch, "engine": engine, "against": against, "label": label,
                              "ratio": round(speed[engine] / speed[against], 2)})
    return found


def _timed(fn: Callable) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _engines(model, name: str | None, example: torch.Tensor, ours: Sequence[str], compare: Sequence[str],
             workdir: Path, threads: int | None, calib_dir: str | None, calib_images: int, skipped: list[dict],
             precisions: Sequence[str] = ("fp32",), metadata: dict | None = None) -> dict[str, Callable]:
    """Every engine that can run here, as `images -> logits`; the rest go to `skipped` with a reason."""
    from ..infer.export import export_onnx
    engines: dict[str, Callable] = {}
    if "eager" in ours:
        engines["swinkit eager"] = model
    config = model.config
    if "optimized" in ours:
        for precision in precisions:
            if precision != INT8:
                engines[optimized_label(precision)] = optimize_for_inference(model, dtype=precision)
            elif calib_dir is None:
                skipped.append({"engine": optimized_label(INT8), "reason": "needs calibration images: pass --calib DIR"})
            else:
                from ..infer.quantize import calibration_images
                preprocess = Preprocess.from_metadata(metadata or {}, config)
                engines[optimized_label(INT8)] = optimize_for_inference(
                    model, dtype=INT8, calibration=calibration_images(preprocess, calib_dir, calib_images))

    def attempt(label: str, build: Callable[[], Callable]) -> None:
        try:
            engines[label] = build()
        except peers.PeerUnavailable as error:
            skipped.append({"engine": label, "reason": str(error)})
        except Exception as error:  # a peer's own failure must not end the benchmark
            skipped.append({"engine": label, "reason": f"{type(error).__name__}: {error}"})
            log.debug("bench: %s failed", label, exc_info=True)

    onnx_path = workdir / "swinkit.onnx"

    def swinkit_ort():
        peers._require("onnxruntime")
        from ..infer.onnx_runner import OnnxRunner
        export_onnx(model, onnx_path)
        return OnnxRunner(onnx_path, threads=threads)
    if "onnxruntime" in ours or "int8" in ours:
        attempt("swinkit onnxruntime", swinkit_ort)
    if "int8" in ours and "swinkit onnxruntime" in engines:
        if calib_dir is None:
            skipped.append({"engine": "swinkit int8", "reason": "needs calibration images: pass --calib DIR"})
        else:
            def swinkit_int8():
                from ..infer.onnx_runner import OnnxRunner
                from ..infer.quantize import quantize
                return OnnxRunner(quantize(onnx_path, calib_dir, workdir / "swinkit.int8.onnx", images=calib_images),
                                  threads=threads)
            attempt("swinkit int8", swinkit_int8)
    if "onnxruntime" not in ours:
        engines.pop("swinkit onnxruntime", None)
    if "timm" in compare:
        attempt("timm eager", lambda: peers.timm_eager(config, example))
        attempt("timm jit.trace", lambda: peers.timm_jit(config, example))
    if "timm-ftz" in compare:
        attempt("timm eager ftz", lambda: peers.timm_eager(config, example))
        attempt("timm jit.trace ftz", lambda: peers.timm_jit(config, example))
    if "torchvision" in compare:
        attempt("torchvision", lambda: peers.torchvision_model(name, config, example))
    if "hf" in compare:
        attempt("hf", lambda: peers.hf_model(config, example))
    if "onnxruntime" in compare:
        attempt("timm onnxruntime", lambda: peers.timm_onnxruntime(config, example, workdir, threads))
    return engines


def bench_infer(model_name: str | None = None, *, weights: str | Path | None = None,
                batch_sizes: Iterable[int] = (1, 8), compare: Iterable[str] = PEERS,
                swinkit: Iterable[str] = SWINKIT_ENGINES, threads: int | None = None,
                rounds: int = 5, warmup: int = 2, img_size: int | tuple[int, int] | None = None,
                calib_dir: str | Path | None = None, calib_images: int = 64, measure_peak: bool = True,
                precisions: Iterable[str] = ("fp32",)) -> dict:
    """Run the inference benchmark; returns {"header": ..., "rows": [...], "skipped": [...]}.

    `swinkit` picks our engines (eager, optimized, onnxruntime, int8), `compare` the peers;
    `precisions` (fp32, bf16, fp16, int8) the precisions of the optimized path, one row each (`optimized_label`;
    int8 needs `calib_dir`, as the ONNX INT8 engine does).
    Each row: batch, engine, ms (median per batch), img_s, speedup (vs `baseline`), baseline, and
    dtype, gflops, peak_gflops, pct_peak (`machine.peak_fields`; the header's "gemm_peaks" holds the
    measurement per batch size). Peers in `compare` that cannot run are listed in "skipped" with the reason.
    """
    compare = [c.strip() for c in compare if c.strip()]
    unknown = sorted(set(compare) - set(PEERS))
    if unknown:
        raise ValueError(f"unknown peers {unknown}; choose from {', '.join(PEERS)}")
    ours = [e.strip() for e in swinkit if e.strip()]
    unknown = sorted(set(ours) - set(SWINKIT_ENGINES))
    if unknown:
        raise ValueError(f"unknown swinkit engines {unknown}; choose from {', '.join(SWINKIT_ENGINES)}")
    batch_sizes = sorted({int(b) for b in batch_sizes})
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be positive integers, got {batch_sizes}")
    if rounds < 1 or warmup < 0:
        raise ValueError("rounds must be >= 1 and warmup >= 0")
    precisions = list(dict.fromkeys(precisions))
    dtypes = [inference_dtype(p) for p in precisions if p != INT8]  # PrecisionError for unknown names
    if threads:
        torch.set_num_threads(threads)
    kept = keep_freed_memory(True)
    model = api.create_model(model_name, pretrained=weights).eval()
    if img_size is None:
        img_size = model.config.img_size
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    flops = flops_per_image(model, img_size)
    header = {
        "model": model.name or model_name or str(weights), "weights": str(weights) if weights else None,
        "img_size": list(img_size), "gflops_per_image": round(flops / 1e9, 3),
        **machine.machine_info(),  # cpu, its capability and bf16 units, threads, torch, load, instruction-set limits
        "rounds": rounds, "warmup": warmup, "precisions": precisions, "freed_memory_kept": kept,
        "notes": [note for note in (slow_precision_note(dtype, "cpu") for dtype in dtypes) if note],
    }
    try:
        import onnxruntime
        header["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    header["gemm_peaks"] = {}
    skipped: list[dict] = []
    rows: list[dict] = []
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="swinkit-bench-") as scratch:
        example = torch.randn(max(batch_sizes), model.config.in_chans, *img_size, generator=generator)
        engines = _engines(model, model.name or model_name, example[:1], ours, compare, Path(scratch), threads,
                           None if calib_dir is None else str(calib_dir), calib_images, skipped, precisions,
                           read_metadata(Path(weights)) if weights else {})
        for batch in batch_sizes:
            images = example[:batch].contiguous()
            peaks = shapes = None
            if measure_peak:
                shapes = machine.linear_shapes(model, batch, img_size)
                peaks = machine.measure_peaks(shapes)
            times = _measure(engines, images, rounds, warmup, skipped, batch)
            if measure_peak:  # sampled again after the rounds: the best of both moments
                peaks = header["gemm_peaks"][batch] = machine.measure_peaks(shapes, previous=peaks)
            rows += _rows(times, batch, flops, peaks)
    header["load_average_after"] = machine.load_average()
    return {"header": header, "rows": rows, "ratios": ratios(rows), "skipped": skipped}


def _enter_mode(label: str) -> None:
    """Switch the process to `label`'s float mode (`denormal_mode`) where it differs; before, not inside,
    the engine's timed call."""
    flush = denormal_mode(label) == "flush"
    if denormals_flushed() != flush:
        flush_denormals(flush)


def _measure(engines: dict[str, Callable], images: torch.Tensor, rounds: int, warmup: int, skipped: list[dict],
             batch: int) -> dict[str, list[float]]:
    live = dict(engines)
    with torch.inference_mode():
        for label, engine in list(live.items()):
            _enter_mode(label)
            try:
                for _ in range(max(warmup, 1)):  # at least one call: a failure shows before timing
                    engine(images)
            except Exception as error:
                skipped.append({"engine": label, "batch": batch, "reason": f"{type(error).__name__}: {error}"})
                del live[label]
        times: dict[str, list[float]] = {label: [] for label in live}
        for _ in range(rounds):
            for label, engine in live.items():
                _enter_mode(label)
                times[label].append(_timed(lambda: engine(images)))
    return times


def _rows(times: dict[str, list[float]], batch: int, flops: int, peaks: dict | None) -> list[dict]:
    medians = {label: statistics.median(values) for label, values in times.items()}
    baseline = next((b for b in BASELINES if b in medians), None)
    rows = []
    for label in sorted(medians, key=ENGINE_ORDER.index):
        seconds = medians[label]
        row = {"batch": batch, "engine": label, "ms": round(seconds * 1000, 2), "img_s": round(batch / seconds, 2),
               "min_ms": round(min(times[label]) * 1000, 2),
               "speedup": round(medians[baseline] / seconds, 2) if baseline else None, "baseline": baseline,
               "denormals": denormal_mode(label),
               **machine.peak_fields(flops * batch / seconds / 1e9, machine.row_dtype(
                   amp=label == optimized_label("bf16"), int8=label in INT8_ENGINES), peaks)}  # fp16: fp32's
        rows.append(row)
    return rows


def format_table(result: dict) -> str:
    """The human-readable report: header, then per batch size one line per engine."""
    header = result["header"]
    size = "x".join(map(str, header["img_size"]))
    lines = [f"swinkit bench infer: {header['model']} at {size} ({header['gflops_per_image']} GFLOP/image)",
             f"CPU: {header['cpu']}"
             + (f" ({header['cpu_capability']})" if header.get("cpu_capability") else "")
             + f", {header['threads']} threads; torch {header['torch']}"
             + (f", onnxruntime {header['onnxruntime']}" if "onnxruntime" in header else "")
             + f"; median (and best) of {header['rounds']} interleaved rounds after {header['warmup']} warm-up calls;"
             f" load average {header['load_average']} -> {header.get('load_average_after')}"]
    if header.get("isa_limits"):
        lines.append(machine.format_isa_limits(header["isa_limits"]))
    peaks = header.get("gemm_peaks") or {}
    for batch in sorted({row["batch"] for row in result["rows"]}):
        rows = [row for row in result["rows"] if row["batch"] == batch]
        baseline = rows[0]["baseline"] if rows else None
        lines.append("")
        lines.append(f"batch {batch}")
        measured = peaks.get(batch) or peaks.get(str(batch))  # (str keys after a JSON round trip)
        if measured:
            lines.append("  " + machine.format_peaks(measured, f" at batch {batch}"))
        speedup_title = f"speedup vs {baseline}" if baseline else "speedup"
        lines.append(f"  {'engine':<22} {'ms/batch':>10} {'best ms':>9} {'img/s':>9} {speedup_title:>28} "
                     f"{'GFLOP/s':>8} {'% peak':>12}")
        for row in rows:
            speedup = f"{row['speedup']:.2f}x" if row["speedup"] is not None else "-"
            pct = f"{row['pct_peak']:.0f}% {row['dtype']}" if row.get("pct_peak") is not None else "-"
            best = f"{row['min_ms']:.1f}" if row.get("min_ms") is not None else "-"
            lines.append(f"  {row['engine']:<22} {row['ms']:>10.1f} {best:>9} {row['img_s']:>9.2f} {speedup:>28} "
                         f"{row['gflops']:>8.1f} {pct:>12}")
        for item in result.get("ratios", []):
            if item["batch"] == batch:
                lines.append(f"  {item['label']}: {item['ratio']:.2f}x img/s")
    for note in header.get("notes", []):
        lines.append(f"note: {note}")
    for item in result["skipped"]:
        where = f" (batch {item['batch']})" if "batch" in item else ""
        lines.append(f"skipped {item['engine']}{where}: {item['reason']}")
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> Path:
    """Grouped bar chart of img/s per engine and batch size (needs matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ..files import atomic_write
    rows = result["rows"]
    batches = sorted({row["batch"] for row in rows})
    engines = [e for e in ENGINE_ORDER if any(row["engine"] == e for row in rows)]
    figure, axes = plt.subplots(figsize=(1.6 + 1.3 * len(engines) * len(batches) / 2, 4))
    width = 0.8 / max(len(engines), 1)
    for i, engine in enumerate(engines):
        values = [next((r["img_s"] for r in rows if r["engine"] == engine and r["batch"] == b), 0) for b in batches]
        axes.bar([x + i * width for x in range(len(batches))], values, width, label=engine)
    axes.set_xticks([x + width * (len(engines) - 1) / 2 for x in range(len(batches))])
    axes.set_xticklabels([f"batch {b}" for b in batches])
    axes.set_ylabel("images / s")
    header = result["header"]
    axes.set_title(f"{header['model']} {'x'.join(map(str, header['img_size']))}, {header['threads']} threads")
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120))
    plt.close(figure)
    return path
