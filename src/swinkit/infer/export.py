"""ONNX export with dynamic batch, height and width, checked against PyTorch before it is kept.

    export_onnx("model.safetensors", "model.onnx")                   # batch, H, W dynamic
    export_onnx(model, "model.onnx", dynamic=("batch",))             # H, W fixed at the model's img_size

The graph is the fast path's (`infer.fast.FastSwin`) export formulation: every index map
and shift/padding mask is computed inside the graph from the input's shape with
branch-free tensor arithmetic, so one file serves any input size; with static sizes
the same subgraphs fold to constants. The file is written atomically, only after
`onnx.checker` and ONNX Runtime (graph optimizations on) agree with the PyTorch eval
model within `tolerance` at batch 1 and 3 and two resolutions.

Metadata (`metadata_props`): `swinkit_preprocess`, `swinkit_classes` (when the source
checkpoint names its classes), `swinkit_config`, `swinkit_name`, `swinkit_dynamic`,
`swinkit_validation`.
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
from ..metadata import META_CLASSES, META_DYNAMIC, META_VALIDATION, Preprocess, read_metadata
from ..models.swin import SwinTransformer
from ..weights.io import CheckpointError
from .fast import FastSwin

log = logging.getLogger("swinkit")

DYNAMIC_AXES = ("batch", "hw")
MAX_SIDE = 8192


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
                validate: bool = True, tolerance: float = 1e-4) -> Path:
    """Export a Swin model (or any checkpoint swinkit reads) to ONNX; returns the written path.

    `dynamic`: which axes stay free, from ("batch", "hw"). Without "hw" the file takes only the
    model's `img_size`. Raises `ExportError` (nothing written) when the export fails or ONNX
    Runtime disagrees with PyTorch by more than `tolerance`.
    """
    import onnx
    import torch.fx.experimental._config as fx_config

    axes = _dynamic(dynamic)
    model, checkpoint_metadata, source = load_source(model_or_weights, model_name)
    out = Path(out)
    if "hw" not in axes:
        log.warning("exporting %s with height and width fixed at %s (add 'hw' to dynamic for any size)",
                    source, "x".join(map(str, model.config.img_size)))
    fast = FastSwin(model, use_onednn=False, split_qkv=True)  # plain ops: oneDNN calls do not export
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
        _set_metadata(proto, metadata)
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as error:
            raise ExportError(f"the ONNX graph exported from {source} is invalid: {error}") from None
        onnx.save(proto, str(raw))
        if validate:
            training = model.training
            try:
                report = validate_onnx(raw, model.eval(), validation_sizes(model, axes))
            finally:
                model.train(training)
            worst = max(row["max_abs_diff"] for row in report)
            if worst > tolerance:
                raise ExportError(f"ONNX Runtime output of {source} differs from PyTorch by {worst:.3g} "
                                  f"(> {tolerance:g}): {report}")
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
                  *, seed: int = 0) -> list[dict]:
    """Run `path` in ONNX Runtime and `model` in PyTorch on the same random images; per size the
    max absolute logit difference."""
    from .onnx_runner import create_session
    session = create_session(path)
    name = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(seed)
    in_chans = getattr(getattr(model, "config", None), "in_chans", 3)
    report = []
    for batch, height, width in sizes:
        images = torch.randn(batch, in_chans, height, width, generator=generator)
        with torch.no_grad():
            expected = model(images)
        got = torch.from_numpy(session.run(None, {name: images.numpy()})[0])
        report.append({"batch": batch, "height": height, "width": width,
                       "max_abs_diff": float((got - expected).abs().max())})
    return report
