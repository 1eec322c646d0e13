"""`swinkit export onnx` and `swinkit quantize`: argument parsing around `infer.export` / `infer.quantize`."""
from __future__ import annotations

import json
import sys

from ..cli_types import add_precision_flag, positive_int


def _cmd_export(args) -> int:
    from .export import ExportError, export_onnx, export_opset
    try:
        out = export_onnx(args.weights, args.out, opset=args.opset, dynamic=args.dynamic, model_name=args.model,
                          validate=not args.no_validate, precision=args.precision)
    except ExportError as error:
        print(f"swinkit export: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.precision}, opset {export_opset(args.opset, args.precision)}, "
          f"dynamic: {args.dynamic or 'none'}{', not validated' if args.no_validate else ''})")
    return 0


def _cmd_quantize(args) -> int:
    from .quantize import compare_accuracy, cpu_scheme, quantize
    if args.engine == "torch":
        return _quantize_torch(args)
    if not args.out:
        print("swinkit quantize: error: --out is required (the INT8 .onnx file to write)", file=sys.stderr)
        return 2
    cpu = args.cpu or cpu_scheme()
    out = quantize(args.weights, args.calib, args.out, images=args.images, model_name=args.model,
                   method=args.method, quantize_head=args.quantize_head, cpu=cpu)
    print(f"wrote {out} (INT8 QDQ for {cpu} CPUs, calibrated on {args.images} images from {args.calib})")
    if args.eval:
        from .export import export_onnx
        import tempfile
        from pathlib import Path
        with tempfile.TemporaryDirectory() as scratch:
            fp32 = args.weights if str(args.weights).endswith(".onnx") else export_onnx(
                args.weights, Path(scratch) / "fp32.onnx", model_name=args.model)
            table = compare_accuracy(fp32, out, args.eval, images=args.eval_images)
        _print_table(args, table)
    return 0


def _quantize_torch(args) -> int:
    """`--engine torch`: the PyTorch INT8 path is calibrated when it is loaded (`eval/predict --precision int8
    --calib`), so there is no file to write; with --eval, its PTQ table against the fp32 path."""
    from .quantize import compare_accuracy
    from .runner import load_runner
    problems = [flag for flag, given in (("--out", args.out), ("--cpu", args.cpu), ("--quantize-head", args.quantize_head),
                                         (f"--method {args.method}", args.method != "minmax")) if given]
    if problems:
        print(f"swinkit quantize: error: {', '.join(problems)}: not for --engine torch (minmax calibration, float "
              "head, calibrated when loaded: nothing is written)", file=sys.stderr)
        return 2
    if str(args.weights).endswith(".onnx"):
        print("swinkit quantize: error: --engine torch takes a checkpoint, not an .onnx file", file=sys.stderr)
        return 2
    int8 = load_runner(args.weights, model_name=args.model, device="cpu", precision="int8", calib=args.calib,
                       calib_images=args.images)
    print(f"PyTorch INT8 (oneDNN int8 linears) calibrated on {args.images} images from {args.calib}")
    if args.eval:
        fp32 = load_runner(args.weights, model_name=args.model, device="cpu")
        _print_table(args, compare_accuracy(fp32, int8, args.eval, images=args.eval_images))
    return 0


def _print_table(args, table: dict) -> None:
    if args.json:
        print(json.dumps(table))
    else:
        print(f"{'':8}{'top-1':>8}{'top-' + str(table['top5_k']):>8}   ({table['images']} images from {args.eval})")
        print(f"{'FP32':8}{table['fp32_top1']:>8.2f}{table['fp32_top5']:>8.2f}")
        print(f"{'INT8':8}{table['int8_top1']:>8.2f}{table['int8_top5']:>8.2f}")
        print(f"{'loss':8}{table['top1_loss']:>8.2f}{table['top5_loss']:>8.2f}   "
              f"top-1 agreement {table['top1_agreement']:.2f}%")
        print(f"logits: max |INT8 - FP32| {table['logits_max_abs_diff']:.4f}, mean "
              f"{table['logits_mean_abs_diff']:.4f}, cosine {table['logits_cosine']:.5f}")


def register(subparsers) -> None:
    export = subparsers.add_parser("export", help="export a model to a deployment format")
    formats = export.add_subparsers(dest="format", required=True)
    onnx = formats.add_parser("onnx", help="ONNX with dynamic batch/height/width, checked in ONNX Runtime")
    onnx.add_argument("--weights", required=True, help="checkpoint (any layout swinkit reads)")
    onnx.add_argument("--model", help="model name, for checkpoints that do not say which variant they hold")
    onnx.add_argument("--out", required=True, help="output .onnx file (written only after validation)")
    onnx.add_argument("--opset", type=positive_int, default=18)
    onnx.add_argument("--dynamic", default="batch,hw", help="dynamic axes: batch,hw (default), batch, or ''")
    onnx.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    add_precision_flag(onnx, "compute dtype of the graph (inputs and logits stay fp32): fp16 is for GPU providers "
                       "(ONNX Runtime's CPU provider runs it through casts, slower than fp32); bf16 runs only on the "
                       "CUDA provider (opset >= 22) and needs onnxruntime-gpu to validate, else --no-validate")
    onnx.set_defaults(func=_cmd_export)

    quant = subparsers.add_parser("quantize", help="INT8 post-training quantization calibrated on real images")
    quant.add_argument("--weights", required=True, help="checkpoint or FP32 .onnx file")
    quant.add_argument("--model", help="model name, for checkpoints that do not say which variant they hold")
    quant.add_argument("--calib", required=True, help="image folder (DIR/<class>/<image>) for calibration")
    quant.add_argument("--engine", choices=("onnxruntime", "torch"), default="onnxruntime",
                       help="onnxruntime (default): write an INT8 .onnx file; torch: the PyTorch INT8 path (oneDNN int8 "
                            "linears, calibrated when loaded: `eval --precision int8 --calib`), with --eval its table")
    quant.add_argument("--out", help="output INT8 .onnx file (onnxruntime engine; required there)")
    quant.add_argument("--images", type=positive_int, default=256, help="calibration images (default 256)")
    quant.add_argument("--method", default="minmax", choices=("minmax", "percentile", "entropy"))
    quant.add_argument("--quantize-head", action="store_true", help="quantize the classifier too (default: float)")
    from .quantize import INT8_SCHEMES  # the CPU kinds and what each gets are defined there
    quant.add_argument("--cpu", choices=tuple(INT8_SCHEMES), help="CPU kind the file is for: vnni (AVX512-VNNI/AVX-VNNI/AMX: attention matmuls "
                       "in INT8 too) or avx2 (the same with 7-bit weights); default: this machine's")
    quant.add_argument("--eval", help="image folder to report FP32 vs INT8 top-1/top-5 on")
    quant.add_argument("--eval-images", type=positive_int, help="evaluate on this many images (default: all)")
    quant.add_argument("--json", action="store_true")
    quant.set_defaults(func=_cmd_quantize)
