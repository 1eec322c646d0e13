"""Runners: a weights file turned into "normalised image batch -> logits", plus what it needs.

`evaluate` and `predict` never touch a model directly; they do

    runner = load_runner(weights, model_name=..., device=...)   # once
    transform = runner.preprocess.transform()                   # PIL image -> [C, H, W]
    logits = runner(batch)                                      # [B, C, H, W] -> [B, K]

so another engine (ONNX Runtime for an `.onnx` file) only has to provide an object with
the same four attributes (`source`, `classes`, `preprocess`, `__call__`) and a branch in
`load_runner`.

The checkpoint's own description (class names, preprocessing, config) is read with
`swinkit.metadata`, the one place that defines those entries.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from .. import api
from ..metadata import Preprocess, classes_from_metadata, read_metadata
from ..weights.io import CheckpointError
from ..precision import INT8, PrecisionError, inference_dtype, inference_precision
from .optimize import optimize_for_inference
from .int8 import is_int8


class Runner(Protocol):
    """What evaluate/predict need from an inference engine."""

    source: str                 # the weights file, for messages
    classes: list[str]          # class names in output-index order
    named_classes: bool         # True when the names came from the checkpoint (not index strings)
    preprocess: Preprocess

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, in_chans, H, W] float32 -> logits [B, num_classes] float32."""


class TorchRunner:
    """A swinkit model in eval mode on one device; calls run under `torch.inference_mode`. Images are
    cast to the model's dtype (its `precision`: fp32, bf16, fp16), logits come back in fp32."""

    def __init__(self, model: torch.nn.Module, preprocess: Preprocess, classes: list[str], *,
                 named_classes: bool = True, device: str | torch.device | None = None, source: str = "<model>"):
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.eval().to(self.device)
        self.dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)
        self.precision = INT8 if is_int8(self.model) else inference_precision(self.dtype)
        self.preprocess = preprocess
        self.classes = classes
        self.named_classes = named_classes
        self.source = source

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            logits = self.model(images.to(self.device, self.dtype, non_blocking=True)).float()
        if self.dtype == torch.float16 and not bool(torch.isfinite(logits).all()):
            raise PrecisionError(f"{self.source} overflowed in fp16 (logits not finite: fp16 ends at 65504); "
                                 "use --precision bf16 (fp32's range) or fp32")
        return logits


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_classifier(path: Path, model_name: str | None = None) -> tuple:
    """A weights file (any layout) -> (the PyTorch classifier, its `Preprocess`, class names, whether the
    names come from the file), read from the checkpoint's metadata; every backend's runner starts here.
    Raises `CheckpointError` naming the file when it has no classifier head."""
    model = api.create_model(model_name, pretrained=path)
    if model.num_classes == 0:
        raise CheckpointError(f"'{path}' has no classifier head (num_classes 0); it cannot classify images")
    metadata = read_metadata(path)
    preprocess = Preprocess.from_metadata(metadata, model.config, source=str(path))
    classes, named = classes_from_metadata(metadata, model.num_classes, source=str(path))
    return model, preprocess, classes, named


def load_runner(weights: str | Path, *, model_name: str | None = None,
                device: str | torch.device | None = None, precision: str = "fp32",
                calib: str | Path | None = None, calib_images: int = 256,
                preprocess: Preprocess | Mapping[str, Any] | None = None) -> Runner:
    """Weights file -> runner (PyTorch: `optimize_for_inference` of the model in `precision`, fp32 / bf16 /
    fp16, or int8 on CPU: its linears in oneDNN's int8 kernels, calibrated on `calib_images` images of the
    image folder `calib`; `.onnx`: ONNX Runtime, in the precision the file was exported in).
    `preprocess` overrides the checkpoint's preprocessing (`with_preprocess`; int8 calibrates with it).
    A swinkit safetensors rebuilds its own model; any other layout
    needs `model_name`. Raises `CheckpointError` naming the file when it cannot be used, `PrecisionError`
    for a precision it cannot run in (or int8 without `calib`)."""
    int8 = precision == INT8
    dtype = torch.float32 if int8 else inference_dtype(precision)
    if int8 and calib is None:
        raise PrecisionError("--precision int8 needs calibration images: pass --calib DIR (an image folder)")
    if calib is not None and not int8:
        raise PrecisionError(f"--calib is for --precision int8; it does nothing with --precision {precision}")
    if int8 and device is not None and torch.device(device).type != "cpu":
        raise PrecisionError(f"--precision int8 runs on CPU (oneDNN's int8 kernels), not on {device}")
    path = Path(weights).expanduser()
    if not path.exists():
        raise CheckpointError(f"weights file '{path}' does not exist")
    if path.suffix == ".onnx":
        if dtype != torch.float32 or int8:
            raise PrecisionError(f"'{path}' is an ONNX graph: it runs in the precision it was exported in; drop "
                                 f"--precision {precision} (export with `swinkit export onnx --precision ...`)")
        from .onnx_runner import OnnxRunner  # ONNX Runtime: FP32, FP16 or INT8 exports, same preprocessing
        return OnnxRunner(path, device=device)
    model, stored, classes, named = load_classifier(path, model_name)
    runner_preprocess = changed_preprocess(stored, preprocess)
    if int8:
        from .quantize import calibration_images
        device = "cpu"
        fast = optimize_for_inference(model, dtype=INT8, calibration=calibration_images(
            runner_preprocess, calib, calib_images))
    else:
        # The frozen fast path (same definition, constants precomputed, oneDNN linears on CPU), built on the
        # device it runs on (so a warning about missing bf16/fp16 units names the right one).
        model = model.to(torch.device(device) if device is not None else default_device())
        fast = optimize_for_inference(model, dtype=dtype)
    return TorchRunner(fast, runner_preprocess, classes, named_classes=named, device=device, source=str(path))


def with_preprocess(runner: Runner, preprocess: Preprocess | Mapping[str, Any] | None) -> Runner:
    """`runner` with its preprocessing replaced (a `Preprocess`) or partly changed (a mapping of fields).

    The caller's runner is left as it was: a shallow copy (sharing the model) gets the change."""
    changed = changed_preprocess(runner.preprocess, preprocess)
    if changed is runner.preprocess:
        return runner
    runner = copy.copy(runner)
    runner.preprocess = changed
    return runner


def changed_preprocess(base: Preprocess, preprocess: Preprocess | Mapping[str, Any] | None) -> Preprocess:
    """`preprocess` if it is a `Preprocess`, `base` with the mapping's non-None fields replaced, else `base`."""
    if isinstance(preprocess, Preprocess):
        return preprocess
    if preprocess and any(value is not None for value in preprocess.values()):
        return base.replace(**preprocess)
    return base
