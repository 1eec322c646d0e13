"""Post-training INT8 quantization through ONNX Runtime, calibrated on real images.

    quantize("model.safetensors", "data/val", "model.int8.onnx", images=256)
    compare_accuracy("model.onnx", "model.int8.onnx", "data/val")   # FP32 vs INT8 top-1/top-5, logits

Static QDQ quantization: weights int8 per output channel (symmetric), activations uint8
with ranges from running the FP32 graph on `images` calibration images prepared exactly as
at eval time (`swinkit.data.ImageFolderDataset` + the file's stored preprocessing). The FP32
graph first gets ONNX Runtime's portable fusions (GELU, LayerNorm). What is quantized
depends on the CPU the file is for (`INT8_SCHEMES`, default: this machine's; recorded in
the file's `swinkit_quantization` metadata):

- `vnni` (AVX512-VNNI / AVX-VNNI / AMX): the linears, the patch-embedding Conv and the two
  activation-by-activation attention matmuls (q @ k^T and attn @ v); the linears return
  float (QGemm with float output) straight to LayerNorm, GELU and the residual adds, so no
  uint8 requantization + DequantizeLinear sits between them.
- `avx2` (no VNNI): the same nodes and float outputs, with 7-bit weights (`reduce_range`) so the
  u8 x s8 kernels cannot saturate (the attention matmuls are u8 x u8, exact on AVX2).

Softmax, LayerNorm, GELU and the residual stream stay float; so does the classifier head
unless `quantize_head=True`.
"""
from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..data import ImageFolderDataset
from ..files import atomic_write
from ..metadata import META_QUANTIZATION, Preprocess
from ..metrics import percent, topk_hits
from ..models.swin import SwinTransformer
from ..precision import PrecisionError, cpu_flags
from .onnx_runner import OnnxRunner

log = logging.getLogger("swinkit")

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


def cpu_has_vnni() -> bool:
    """True when the CPU has 8-bit dot-product instructions (AVX512-VNNI or AVX-VNNI)."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni"})


# What `quantize` puts in INT8 for each CPU kind (README "INT8" has the measurements).
#   attention_matmuls: q @ k^T and attn @ v in INT8 too (MatMulIntegerToFloat / QLinearMatMul)
#   linear_outputs:    "float": QGemm hands float to the float ops after it; "uint8": requantized,
#                      then a DequantizeLinear before LayerNorm / GELU / the residual add
#   reduce_range:      7-bit weights, for u8 x s8 kernels that can saturate without VNNI
INT8_SCHEMES: dict[str, dict] = {
    "vnni": {"attention_matmuls": True, "linear_outputs": "float", "reduce_range": False},
    # measured on an AVX2-only CPU (`scripts/emulate_cpu.sh avx2`): Swin-T at batch 8 1.44x our FP32 file,
    # where the earlier scheme (linears and patch Conv only, uint8 outputs) ran 1.23x
    "avx2": {"attention_matmuls": True, "linear_outputs": "float", "reduce_range": True},
}


def cpu_scheme() -> str:
    """The `INT8_SCHEMES` key for this machine's CPU."""
    return "vnni" if cpu_has_vnni() else "avx2"


def calibration_images(preprocess: Preprocess, calib_dir: str | os.PathLike, images: int, batch_size: int = 8,
                       seed: int = 0) -> list[torch.Tensor]:
    """`images` images from an image folder (an even random sample, fixed seed), preprocessed as at
    eval time (`preprocess`), in `[B, C, H, W]` float32 batches. Both INT8 paths calibrate on these."""
    if images < 1:
        raise ValueError(f"calibration images must be >= 1, got {images}")
    dataset = ImageFolderDataset(calib_dir, transform=preprocess.transform(), in_chans=preprocess.in_chans)
    indices = list(range(len(dataset)))
    random.Random(seed).shuffle(indices)
    indices = indices[:images]
    return [torch.stack([dataset[i][0] for i in indices[start:start + batch_size]])
            for start in range(0, len(indices), batch_size)]


def calibration_batches(runner: OnnxRunner, calib_dir: str | os.PathLike, images: int, batch_size: int = 8,
                        seed: int = 0) -> list[np.ndarray]:
    """`calibration_images` for an ONNX graph's preprocessing, as numpy batches."""
    return [batch.numpy() for batch in calibration_images(runner.preprocess, calib_dir, images, batch_size, seed)]


def _reader(name: str, batches: list[np.ndarray]):
    from onnxruntime.quantization import CalibrationDataReader

    class _Batches(CalibrationDataReader):
        def __init__(self):
            self._items: Iterator = iter(batches)

        def get_next(self):
            batch = next(self._items, None)
            return None if batch is None else {name: batch}

        def rewind(self):
            self._items = iter(batches)

    return _Batches()


def fuse_for_quantization(model_path: Path, out: Path) -> Path:
    """ONNX Runtime's hardware-independent fusions (ORT_ENABLE_EXTENDED: Gelu, LayerNorm, ...) applied
    before quantizing. Left to the INT8 session instead, the QDQ nodes hide the GELU pattern and
    it runs unfused (measured: INT8 1.4x -> 2.0x FP32 on Swin-T). The result uses ONNX Runtime's
    com.microsoft ops, so the INT8 file is for ONNX Runtime."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    return out


def quantized_nodes(model_path: str | os.PathLike, *, quantize_head: bool, attention: bool
                    ) -> tuple[list[str], list[str]]:
    """(nodes to quantize, classifier-head nodes) of a swinkit ONNX graph: MatMul/Gemm whose
    second input is a weight initializer, plus Conv, plus (`attention`) the MatMuls of two
    activations (q @ k^T, attn @ v). The head is the last MatMul/Gemm with a weight."""
    import onnx
    graph = onnx.load(str(model_path), load_external_data=False).graph
    constant = {init.name for init in graph.initializer}
    constant |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    linears = [node.name for node in graph.node
               if node.op_type in ("MatMul", "Gemm") and node.input[1] in constant]
    head = [] if quantize_head else linears[-1:]
    chosen = [node.name for node in graph.node
              if (node.op_type == "Conv" or node.name in linears
                  or (attention and node.op_type == "MatMul" and not constant & set(node.input)))
              and node.name not in head]
    return chosen, head


def quantize(weights_or_onnx: SwinTransformer | str | os.PathLike, calib_dir: str | os.PathLike,
             out: str | os.PathLike, *, images: int = 256, model_name: str | None = None,
             method: str = "minmax", quantize_head: bool = False, batch_size: int = 8,
             cpu: str | None = None) -> Path:
    """Calibrated static INT8 (QDQ) ONNX model from a checkpoint or an FP32 `.onnx`; returns `out`.

    A checkpoint is exported first (`export_onnx`, dynamic batch/height/width). `cpu` picks the
    `INT8_SCHEMES` entry the file is built for (default: this machine's, `cpu_scheme()`). The
    output keeps the source's metadata (preprocessing, classes) and records the settings in
    `swinkit_quantization`.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as _quantize_static

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method '{method}'; choose from {', '.join(CALIBRATION_METHODS)}")
    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    cpu = cpu_scheme() if cpu is None else cpu
    if cpu not in INT8_SCHEMES:
        raise ValueError(f"unknown INT8 cpu kind '{cpu}'; choose from {', '.join(INT8_SCHEMES)}")
    scheme = INT8_SCHEMES[cpu]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as scratch:
        source = Path(weights_or_onnx) if not isinstance(weights_or_onnx, SwinTransformer) else None
        if source is None or source.suffix != ".onnx":
            from .export import export_onnx
            fp32 = export_onnx(weights_or_onnx, Path(scratch) / "fp32.onnx", model_name=model_name)
        else:
            fp32 = source
        runner = OnnxRunner(fp32)
        if runner.precision != "fp32":
            raise PrecisionError(f"'{fp32}' is a {runner.precision} ONNX file; INT8 calibration starts from the "
                                 "fp32 export")
        batches = calibration_batches(runner, calib_dir, images, batch_size)
        fp32 = fuse_for_quantization(fp32, Path(scratch) / "fused.onnx")
        nodes, head = quantized_nodes(fp32, quantize_head=quantize_head, attention=scheme["attention_matmuls"])
        options = {"WeightSymmetric": True, "ActivationSymmetric": False}
        if scheme["linear_outputs"] == "float":
            options["OpTypesToExcludeOutputQuantization"] = ["MatMul", "Gemm"]
        quantized = Path(scratch) / "int8.onnx"
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # ORT's advice to run its pre-processing: it measured no faster here
        try:
            _quantize_static(
                str(fp32), str(quantized), _reader(runner.input_name, batches),
                quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=scheme["reduce_range"],
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                nodes_to_quantize=nodes, op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                                  "entropy": CalibrationMethod.Entropy}[method],
                extra_options=options,
            )
        finally:
            root.setLevel(level)
        proto = onnx.load(str(quantized))
        metadata = dict(runner.metadata)
        metadata[META_QUANTIZATION] = json.dumps({
            "format": "QDQ", "cpu": cpu, "weights": "int8 per-channel symmetric", "activations": "uint8 asymmetric",
            "calibration": {"method": method, "images": sum(len(b) for b in batches), "dir": str(calib_dir)},
            **scheme, "quantized_nodes": len(nodes), "float_head": bool(head)})
        del proto.metadata_props[:]
        for key, value in metadata.items():
            proto.metadata_props.add(key=key, value=value)
        atomic_write(out, lambda tmp: onnx.save(proto, str(tmp)))
    return out


def compare_accuracy(fp32, int8, data_dir: str | os.PathLike, *, images: int | None = None, batch_size: int = 16,
                     seed: int = 0) -> dict:
    """FasterTransformer's PTQ table for one pair of models on an image folder: top-1/top-5 of
    each, the INT8 loss in points, how often their top-1 classes agree, and how close the logits
    are (largest and mean absolute difference, mean cosine similarity per image). `fp32` and `int8`
    are `.onnx` files or runners (`infer.runner.load_runner`: the PyTorch INT8 path); the images are
    prepared with `fp32`'s preprocessing."""
    runners = [OnnxRunner(r) if isinstance(r, (str, os.PathLike)) else r for r in (fp32, int8)]
    dataset = ImageFolderDataset(data_dir, transform=runners[0].preprocess.transform(),
                                 in_chans=runners[0].preprocess.in_chans)
    indices = list(range(len(dataset)))
    if images is not None and images < len(indices):
        random.Random(seed).shuffle(indices)
        indices = indices[:images]
    top1 = [0, 0]
    top5 = [0, 0]
    agree = 0
    worst, total_diff, cosine = 0.0, 0.0, 0.0
    k = min(5, len(runners[0].classes))
    for start in range(0, len(indices), batch_size):
        samples = [dataset[i] for i in indices[start:start + batch_size]]
        batch = torch.stack([image for image, _ in samples])
        labels = torch.tensor([label for _, label in samples])
        outputs = []
        for i, runner in enumerate(runners):
            logits = runner(batch)
            hit_top1, hit_topk = topk_hits(logits, labels, k)
            top1[i] += int(hit_top1.sum())
            top5[i] += int(hit_topk.sum())
            outputs.append(logits.double())
        agree += int((outputs[0].argmax(dim=1) == outputs[1].argmax(dim=1)).sum())
        diff = (outputs[1] - outputs[0]).abs()
        worst = max(worst, float(diff.max()))
        total_diff += float(diff.mean(dim=1).sum())
        cosine += float(torch.nn.functional.cosine_similarity(outputs[0], outputs[1], dim=1).sum())
    count = len(indices)

    def pct(value: int) -> float:
        return round(percent(value, count), 2)
    return {"images": count, "fp32_top1": pct(top1[0]), "int8_top1": pct(top1[1]),
            "fp32_top5": pct(top5[0]), "int8_top5": pct(top5[1]), "top5_k": k,
            "top1_loss": round(pct(top1[0]) - pct(top1[1]), 2), "top5_loss": round(pct(top5[0]) - pct(top5[1]), 2),
            "top1_agreement": pct(agree), "logits_max_abs_diff": round(worst, 4),
            "logits_mean_abs_diff": round(total_diff / max(count, 1), 4),
            "logits_cosine": round(cosine / max(count, 1), 5)}
