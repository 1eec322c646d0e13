"""Argument types for the `swinkit` command line: every numeric flag is checked where it is parsed.

A value out of range is refused by argparse itself ("argument --batch-size: must be >= 1, got 0",
exit status 2) before any work starts, instead of running and doing nothing (a batch of 0 that
never flushes, 0 epochs that train nothing) or failing deep inside torch.
"""
from __future__ import annotations

import argparse
import math


def _number(text: str, kind: type):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") \
            from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _ranged(name: str, kind: type, accepts, bound: str):
    """An argparse type: a `kind` number that `accepts`, else "must be {bound}, got ..."."""
    def parse(text: str):
        value = _number(text, kind)
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value if kind is int else text}")
        return value
    parse.__name__ = name
    return parse


positive_int = _ranged("positive_int", int, lambda v: v >= 1, ">= 1")
non_negative_int = _ranged("non_negative_int", int, lambda v: v >= 0, ">= 0")
positive_float = _ranged("positive_float", float, lambda v: v > 0, "> 0")
non_negative_float = _ranged("non_negative_float", float, lambda v: v >= 0, ">= 0")
fraction = _ranged("fraction", float, lambda v: 0 < v <= 1, "in (0, 1]")  # a share, e.g. a centre crop
rate = _ranged("rate", float, lambda v: 0 <= v < 1, "in [0, 1)")  # a probability or tolerance, e.g. drop path


def device(text: str) -> str:
    """cpu, cuda, cuda:N (or mps): a device this machine has."""
    import torch  # only when a --device flag is given
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device (use cpu)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA "
                                             f"device(s), numbered from 0")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine")
    elif parsed.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: swinkit runs on cpu or cuda")
    return text


def device_or_auto(text: str) -> str:
    """`device`, or auto (CUDA when there is one)."""
    return text if text == "auto" else device(text)


def _precision_names(int8: bool) -> tuple[str, ...]:
    from .precision import INFERENCE_PRECISIONS, INT8
    return INFERENCE_PRECISIONS + ((INT8,) if int8 else ())


def precision(text: str, int8: bool = False) -> str:
    """An inference precision: fp32, bf16 or fp16 (`swinkit.precision.INFERENCE_PRECISIONS`), and int8
    where `int8` (the commands that run the PyTorch INT8 path)."""
    names = _precision_names(int8)
    if text not in names:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(names)}, got {text!r}")
    return text


def precisions(text: str, int8: bool = False) -> list[str]:
    """Comma-separated inference precisions, e.g. fp32,bf16 (each checked by `precision`, repeats dropped)."""
    names = [precision(part.strip(), int8) for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected precisions like fp32,bf16, got {text!r}")
    return list(dict.fromkeys(names))


def add_precision_flag(parser: argparse.ArgumentParser, help: str, *, several: bool = False,
                       int8: bool = False) -> None:
    """THE `--precision` flag of the inference commands (eval, predict, export onnx: one value; bench infer:
    `several`, comma-separated); `help` says what it does in that command; `int8`: int8 is one of the
    choices (with `--calib`, see `add_calibration_flags`)."""
    names = _precision_names(int8)
    parser.add_argument("--precision", type=(lambda text: precisions(text, int8)) if several else
                        (lambda text: precision(text, int8)), default=["fp32"] if several else "fp32",
                        metavar=",".join(names) if several else "{" + ",".join(names) + "}",
                        help=f"{help} (default fp32)")


def add_calibration_flags(parser: argparse.ArgumentParser, what: str, default_images: int) -> None:
    """`--calib DIR` and `--calib-images N`: the images INT8 is calibrated on (`what` it is used for)."""
    parser.add_argument("--calib", help=f"image folder to calibrate {what} on (needed for int8)")
    parser.add_argument("--calib-images", type=positive_int, default=default_images,
                        help=f"calibration images for INT8 (default {default_images})")
