"""`swinkit eval` and `swinkit predict`: argument parsing and printing around `evaluate` / `predict`."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from ..cli_types import add_calibration_flags, add_precision_flag, device, fraction, non_negative_int, positive_int
from ..data.transforms import OFFICIAL_CROP_PCT, OFFICIAL_INTERPOLATION
from ..precision import PrecisionError
from .evaluate import evaluate
from .predict import predict


def _size(text: str) -> tuple[int, int]:
    """'224' or '256x192' (height x width)."""
    try:
        parts = [int(part) for part in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size like 224 or 256x192, got {text!r}")
    return (parts[0], parts[-1])


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="checkpoint file (a swinkit safetensors needs no --model)")
    parser.add_argument("--model", help="model name, for checkpoints that do not say which variant they hold")
    parser.add_argument("--device", type=device, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--threads", type=positive_int,
                        help="intra-op CPU threads (torch.set_num_threads; default: torch's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--backend", choices=("torch", "jax"), default="torch",
                        help="torch (default), or jax: the Flax port of the same model (needs swinkit[jax])")
    add_precision_flag(parser, "dtype the model runs in (images cast to it, logits fp32); bf16 is fast on CPUs "
                       "with BF16 units and on GPUs, fp16 is for GPUs (jax: fp32 or bf16 matmuls); int8 (CPU): "
                       "the linears in oneDNN's int8 kernels, calibrated on --calib", int8=True)
    add_calibration_flags(parser, "--precision int8", 256)
    group = parser.add_argument_group("preprocessing (default: what the checkpoint was trained with)")
    group.add_argument("--img-size", type=_size, help="input size, 224 or HxW")
    group.add_argument("--crop-pct", type=fraction,
                       help=f"resize to size / crop-pct, then centre-crop (official: {OFFICIAL_CROP_PCT})")
    group.add_argument("--interpolation", help=f"resize interpolation (official: {OFFICIAL_INTERPOLATION})")


def _apply_threads(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def _weights(args):
    """The weights file, or with --backend jax a runner of the Flax model loaded from it."""
    if args.backend == "jax":
        from ..jax.runner import load_jax_runner
        if args.precision == "int8" or args.calib:
            raise PrecisionError("--backend jax runs fp32 or bf16; int8 (and --calib) is for the torch backend")
        return load_jax_runner(args.weights, model_name=args.model, precision=args.precision)
    return args.weights


def _preprocess_overrides(args) -> dict:
    return {"img_size": args.img_size, "crop_pct": args.crop_pct, "interpolation": args.interpolation}


def _cmd_eval(args) -> int:
    _apply_threads(args)
    result = evaluate(_weights(args), args.data, model_name=args.model, batch_size=args.batch_size,
                      workers=args.workers, device=args.device, preprocess=_preprocess_overrides(args),
                      precision=args.precision, calib=args.calib, calib_images=args.calib_images)
    if args.json:
        print(json.dumps(result))
        return 0
    k = result["top5_k"]
    print(f"weights  {result['weights']}" + (f" ({result['precision']})" if result.get("precision") else ""))
    print(f"data     {result['data']}: {result['images']} images, {len(result['per_class'])} classes"
          f" ({result['seconds']:.1f} s)")
    print(f"top-1    {result['top1']:6.2f}%")
    print(f"top-5    {result['top5']:6.2f}%" + (f"  (top-{k}: the model has {k} classes)" if k < 5 else ""))
    print(f"loss     {result['loss']:.4f}")
    if result["failed"]:
        print(f"skipped  {len(result['failed'])} unreadable images: {', '.join(result['failed'][:5])}")
    width = max(len(name) for name in result["per_class"])
    print("per class top-1:")
    for name, accuracy in result["per_class"].items():
        print(f"  {name:<{width}}  {accuracy:6.2f}%  ({result['per_class_images'][name]} images)")
    return 0


def _cmd_predict(args) -> int:
    _apply_threads(args)
    results = predict(_weights(args), args.images, model_name=args.model, topk=args.topk, device=args.device,
                      batch_size=args.batch_size, preprocess=_preprocess_overrides(args), precision=args.precision,
                      calib=args.calib, calib_images=args.calib_images)
    failed = [entry for entry in results if "error" in entry]
    if args.json:
        print(json.dumps({"weights": args.weights, "precision": args.precision, "results": results}))
    else:
        for entry in results:
            if "error" in entry:
                continue
            print(entry["image"])
            for prediction in entry["predictions"]:
                print(f"  {prediction['prob']:7.4f}  {prediction['class']} ({prediction['index']})")
    for entry in failed:
        print(f"swinkit predict: error: {entry['image']}: {entry['error']}", file=sys.stderr)
    return 1 if failed else 0


def register(subparsers) -> None:
    eval_parser = subparsers.add_parser("eval", help="top-1 / top-5 / per-class accuracy on an image folder")
    _add_common(eval_parser)
    eval_parser.add_argument("--data", required=True,
                             help="dataset root (its val/ split is used) or a folder of class folders")
    eval_parser.add_argument("--batch-size", type=positive_int, default=64)
    eval_parser.add_argument("--workers", type=non_negative_int, default=2,
                             help="DataLoader worker processes (0: none)")
    eval_parser.set_defaults(func=_cmd_eval)

    predict_parser = subparsers.add_parser("predict", help="top-k classes of image files")
    _add_common(predict_parser)
    predict_parser.add_argument("images", nargs="+", metavar="IMAGE")
    predict_parser.add_argument("--topk", type=positive_int, default=5)
    predict_parser.add_argument("--batch-size", type=positive_int, default=32)
    predict_parser.set_defaults(func=_cmd_predict)
