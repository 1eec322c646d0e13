"""ONNX export with dynamic batch, height and width, checked against PyTorch before it is kept.

    export_onnx("model.safetensors", "model.onnx")                   # batch, H, W dynamic
    export_onnx(model, "model.onnx", dynamic=("batch",))             # H, W fixed at the model's img_size

The graph is the fast path's (`infer.fast.FastSwin`) export formulation: every index map
and shift/padding mask is computed inside the graph from the input's shape with
branch-free tensor arithmetic, so one file serves any input size; with static sizes
the same subgraphs fold to constants. The file is written atomically, only after
`onnx.checker` and ONNX Runtime (graph optimizations on) agree with the PyTorch eval
model within `tolerance` at batch 1 and 3 and two resolutions.

Precision (`precision=`, `swinkit export onnx --precision`): the graph computes in fp32, fp16 or
bf16 (weights, activations; softmax stays fp32 as in PyTorch) and takes and returns fp32 (one Cast
at each end), so runners feed it the same images. What ONNX Runtime 1.32 runs:

* fp16 loads on the CPU provider, but its CPU kernels cover few fp16 ops (LayerNormalization,
  Cast, data movement): ORT wraps every Gemm, MatMul, Conv and Add in Casts to fp32 and back,
  so the file is slower than the fp32 one there (Swin-T, batch 8: ~1.2x the time). It is for
  GPU providers (CUDA, TensorRT, DirectML); a warning says so. It is validated on the CPU provider.
* bf16 needs opset 22 (earlier Conv has no bf16; raised automatically) and the CPU provider has
  no bf16 kernels at all ("Could not find an implementation for Conv(22)"): it runs on the CUDA
  provider. It is validated there when onnxruntime-gpu is installed; without it the export is
  refused (`ExportError`) unless `validate=False` (`--no-validate`) asks for an unchecked file.

Half-precision files are checked against the fp32 PyTorch model with a relative tolerance
(`HALF_TOLERANCE` of the largest logit).

Metadata (`metadata_props`): `swinkit_preprocess`, `swinkit_classes` (when the source
checkpoint names its classes), `swinkit_config`, `swinkit_name`, `swinkit_dynamic`,
`swinkit_precision`, `swinkit_validation`.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .. import api
from ..errors import SwinkitError
from ..files import atomic_write
from ..metadata import META_CLASSES, META_DYNAMIC, META_PRECISION, META_VALIDATION, Preprocess, read_metadata
from ..models.swin import SwinTransformer
from ..precision import inference_dtype, inference_precision
from ..weights.io import CheckpointError
from .fast import FastSwin
from .onnx_runner import BF16_ON_CPU

log = logging.getLogger("swinkit")

DYNAMIC_AXES = ("batch", "hw")
MAX_SIDE = 8192
BF16_MIN_OPSET = 22    # ONNX Conv takes bf16 from opset 22
HALF_TOLERANCE = 3e-2  # fp16/bf16 validation: max |ONNX - PyTorch fp32| over the largest |logit|
FP16_ON_CPU = ("ONNX Runtime's CPU provider has fp16 kernels for few ops (LayerNormalization, Cast, data movement): "
               "it wraps Gemm, MatMul, Conv and Add in casts to fp32, which makes an fp16 file slower than the fp32 "
               "one on CPU; fp16 is for GPU providers (CUDA, TensorRT, DirectML)")


def export_opset(opset: int, precision: str = "fp32") -> int:
    """The opset a `precision` export is written with: `opset`, raised to `BF16_MIN_OPSET` for bf16."""
    return max(opset, BF16_MIN_OPSET) if inference_dtype(precision) == torch.bfloat16 else opset


def _bf16_providers() -> list[str] | None:
    """ONNX Runtime providers that run bf16 graphs here (CUDA), or None."""
    import onnxruntime as ort
    return ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in ort.get_available_providers() else None


class ExportError(SwinkitError, RuntimeError):
    """An export that failed or did not reproduce the PyTorch model; nothing was written."""


def _dynamic(dynamic: str | Iterable[str] | None) -> tuple[str, ...]:
    if dynamic is None:
        return ()
    items = [part.strip() for part in dynamic.split(",")] if isinstance(dynamic, str) else list(dynamic)
    items = [item for item in items if item]
    unknown = sorted(set(items) - set(DYNAMIC_AXES))
    if unknown:
        raise ValueError(f"unknown dynamic axes {unknown}; choose from {', '.join(DYNAMIC_AXES)}")
    return tuple(axis for axis in DYNAMIC_AXES if axis in items)


def load_source(model_or_weights: SwinTransformer | str | os.PathLike, model_name: str | None = None
                ) -> tuple[SwinTransformer, dict[str, str], str]:
    """(eval model, the checkpoint's string metadata, a label for messages)."""
    if isinstance(model_or_weights, SwinTransformer):
        return model_or_weights, {}, model_or_weights.name or "<model>"
    path = Path(model_or_weights).expanduser()
    if not path.exists():
        raise CheckpointError(f"weights file '{path}' does not exist")
    model = api.create_model(model_name, pretrained=path).eval()
    return model, read_metadata(path), str(path)


def onnx_metadata(model: SwinTransformer, checkpoint_metadata: Mapping[str, str], source: str) -> dict[str, str]:
    """What a runner needs besides the graph: preprocessing, class names, the config."""
    metadata = api.model_metadata(model)
    metadata.pop("format", None)
    metadata.update(Preprocess.from_metadata(checkpoint_metadata, model.config, source=source).to_metadata())
    if checkpoint_metadata.get(META_CLASSES):
        metadata[META_CLASSES] = checkpoint_metadata[META_CLASSES]
    return metadata


def validation_sizes(model: SwinTransformer, axes: Iterable[str]) -> list[tuple[int, int, int]]:
    """(batch, height, width) checked after export: batch 1 (and 3 when the batch is dynamic) at the
    native size and, when height/width are dynamic, at an odd size that needs padding at every stage."""
    height, width = model.config.img_size
    batches = (1, 3) if "batch" in axes else (1,)
    sizes = [(batch, height, width) for batch in batches]
    if "hw" in axes:
        other = (height * 3 // 4 + 3, width + model.config.patch_size * 2 + 1)
        sizes += [(batch, *other) for batch in batches]
    return sizes


def export_onnx(model_or_weights: SwinTransformer | str | os.PathLike, out: str | os.PathLike, *, opset: int = 18,
                dynamic: str | Iterable[str] | None = DYNAMIC_AXES, model_name: str | None = None,
                validate: bool = True, tolerance: float | None = None, precision: str = "fp32") -> Path:
    """Export a Swin model (or any checkpoint swinkit reads) to ONNX; returns the written path.

    `dynamic`: which axes stay free, from ("batch", "hw"). Without "hw" the file takes only the
    model's `img_size`. `precision`: fp32, fp16 or bf16 compute (see the module docstring for where
    ONNX Runtime runs each). Raises `ExportError` (nothing written) when the export fails or ONNX
    Runtime disagrees with PyTorch by more than `tolerance` (default 1e-4 absolute for fp32;
    for fp16/bf16 a fraction of the largest logit, `HALF_TOLERANCE`).
    """
    import onnx
    import torch.fx.experimental._config as fx_config

    dtype = inference_dtype(precision)
    precision = inference_precision(dtype)
    opset = export_opset(opset, precision)
    providers = None
    if dtype == torch.bfloat16:
        providers = _bf16_providers() if validate else None
        if validate and providers is None:
            raise ExportError(f"cannot validate a bf16 export here: {BF16_ON_CPU}. Pass --no-validate "
                              "(validate=False) to write it unchecked for the CUDA provider, or export fp32 "
                              "(or INT8) for CPUs")
    elif dtype == torch.float16:
        log.warning("fp16 ONNX: %s", FP16_ON_CPU)
    if tolerance is None:
        tolerance = 1e-4 if dtype == torch.float32 else HALF_TOLERANCE
    axes = _dynamic(dynamic)
    model, checkpoint_metadata, source = load_source(model_or_weights, model_name)
    out = Path(out)
    if "hw" not in axes:
        log.warning("exporting %s with height and width fixed at %s (add 'hw' to dynamic for any size)",
                    source, "x".join(map(str, model.config.img_size)))
    fast = FastSwin(model, use_onednn=False, split_qkv=True).to(dtype)  # plain ops: oneDNN calls do not export
    fast.symbolic_sizes = True
    example = torch.randn(2 if "batch" in axes else 1, model.config.in_chans, *model.config.img_size)
    shapes: dict[int, torch.export.Dim] = {}
    if "batch" in axes:
        shapes[0] = torch.export.Dim("batch", min=1, max=4096)
    if "hw" in axes:
        shapes[2] = torch.export.Dim("height", min=1, max=MAX_SIDE)
        shapes[3] = torch.export.Dim("width", min=1, max=MAX_SIDE)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as scratch:
        raw = Path(scratch) / "model.onnx"
        try:
            # Size-oblivious shapes: a stage that fits one window must not pin the size.
            with fx_config.patch(backed_size_oblivious=True), torch.no_grad():
                torch.onnx.export(fast, (example,), str(raw), dynamo=True, opset_version=opset,
                                  input_names=["images"], output_names=["logits"],
                                  dynamic_shapes={"images": shapes} if shapes else None,
                                  external_data=False, verbose=False)
        except Exception as error:
            raise ExportError(f"ONNX export of {source} failed: {type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}") from error
        proto = onnx.load(str(raw))
        metadata = onnx_metadata(model, checkpoint_metadata, source)
        metadata[META_DYNAMIC] = ",".join(axes)
        metadata[META_PRECISION] = precision
        _set_metadata(proto, metadata)
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as error:
            raise ExportError(f"the ONNX graph exported from {source} is invalid: {error}") from None
        onnx.save(proto, str(raw))
        if validate:
            training = model.training
            try:
                report = validate_onnx(raw, model.eval(), validation_sizes(model, axes), providers=providers)
            finally:
                model.train(training)
            # fp32: absolute; fp16/bf16: relative to the largest logit of the fp32 model
            worst = max(row["max_abs_diff"] / (1.0 if dtype == torch.float32 else max(row["max_abs_logit"], 1e-6))
                        for row in report)
            if worst > tolerance:
                raise ExportError(f"ONNX Runtime output of {source} ({precision}) differs from PyTorch by {worst:.3g}"
                                  f"{'' if dtype == torch.float32 else ' of the largest logit'} (> {tolerance:g}): "
                                  f"{report}")
            _set_metadata(proto, {META_VALIDATION: json.dumps(report)})
        atomic_write(out, lambda tmp: onnx.save(proto, str(tmp)))
    return out


def _set_metadata(proto, metadata: Mapping[str, str]) -> None:
    existing = {prop.key: prop for prop in proto.metadata_props}
    for key, value in metadata.items():
        if key in existing:
            existing[key].value = value
        else:
            proto.metadata_props.add(key=key, value=value)


def validate_onnx(path: str | os.PathLike, model: torch.nn.Module, sizes: Iterable[tuple[int, int, int]],
                  *, seed: int = 0, providers: list[str] | None = None) -> list[dict]:
    """Run `path` in ONNX Runtime (CPU unless `providers`) and `model` in PyTorch on the same random images;
    per size the max absolute logit difference and the largest absolute PyTorch logit."""
    from .onnx_runner import create_session
    session = create_session(path, providers=providers)
    name = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(seed)
    in_chans = getattr(getattr(model, "config", None), "in_chans", 3)
    report = []
    for batch, height, width in sizes:
        images = torch.randn(batch, in_chans, height, width, generator=generator)
        with torch.no_grad():
            expected = model(images)
        got = torch.from_numpy(session.run(None, {name: images.numpy()})[0]).float()
        report.append({"batch": batch, "height": height, "width": width,
                       "max_abs_diff": float((got - expected).abs().max()),
                       "max_abs_logit": float(expected.abs().max())})
    return report
