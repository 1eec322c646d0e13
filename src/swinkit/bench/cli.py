"""`swinkit bench`: `infer` (argument parsing and printing around `bench.infer.bench_infer`),
`train` (registered from `bench.train`) and `jax` (from `bench.jax`)."""
from __future__ import annotations

import argparse
import json

from ..cli_types import add_calibration_flags, add_precision_flag, non_negative_int, positive_int


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,8,16, got {text!r}")
    return values


def _cmd_infer(args) -> int:
    from .infer import bench_infer, format_table, plot
    if args.model is None and args.weights is None:
        raise ValueError("bench infer needs --model NAME or --weights FILE")
    compare = [] if args.compare.strip().lower() in ("", "none") else args.compare.split(",")
    result = bench_infer(args.model, weights=args.weights, batch_sizes=args.batch_sizes, compare=compare,
                         swinkit=args.swinkit.split(","),
                         threads=args.threads, rounds=args.rounds, warmup=args.warmup, img_size=args.img_size,
                         calib_dir=args.calib, calib_images=args.calib_images, measure_peak=not args.no_peak,
                         precisions=args.precision)
    if args.plot:
        result["plot"] = str(plot(result, args.plot))
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks: inference against peers, training within a memory budget")
    kinds = bench.add_subparsers(dest="bench", required=True)
    infer = kinds.add_parser("infer", help="ms/batch and img/s of swinkit eager/optimized/ONNX Runtime/INT8 and peers")
    infer.add_argument("--model", help="model name (default: what --weights holds)")
    infer.add_argument("--weights", help="checkpoint to benchmark (peers get random weights of the same shape)")
    infer.add_argument("--batch-sizes", type=_int_list, default=[1, 8], help="comma-separated (default 1,8)")
    infer.add_argument("--compare", default="timm,torchvision,hf,onnxruntime",
                       help="peers: timm,torchvision,hf,onnxruntime,timm-ftz (timm with denormals flushed) or none "
                            "(missing ones are skipped with a note)")
    infer.add_argument("--swinkit", default="eager,optimized,onnxruntime,int8",
                       help="swinkit engines to run: eager,optimized,onnxruntime,int8")
    add_precision_flag(infer, "precisions of the optimized path, one row each ('swinkit optimized bf16'; int8: its "
                       "linears in oneDNN's int8 kernels, needs --calib); the other engines run fp32", several=True,
                       int8=True)
    infer.add_argument("--threads", type=positive_int, help="intra-op threads for torch and ONNX Runtime")
    infer.add_argument("--img-size", type=positive_int, help="square input size (default: the model's)")
    infer.add_argument("--rounds", type=positive_int, default=5,
                       help="interleaved timed rounds; the median is reported")
    infer.add_argument("--warmup", type=non_negative_int, default=2, help="untimed calls per engine and batch size")
    add_calibration_flags(infer, "both INT8 engines (ONNX Runtime's and the PyTorch int8 path; skipped without it)", 64)
    infer.add_argument("--no-peak", action="store_true", help="skip measuring the GEMM peaks")
    infer.add_argument("--json", action="store_true", help="print one JSON object")
    infer.add_argument("--plot", help="write a bar chart of img/s to this .png")
    infer.set_defaults(func=_cmd_infer)

    from .train import register_train  # `bench train` lives with the training benchmark
    register_train(kinds)
    from .jax import register_jax  # `bench jax` lives with the JAX-vs-PyTorch benchmark
    register_jax(kinds, _int_list)
