"""Run a swinkit `.onnx` file (FP32 or INT8) in ONNX Runtime with the call shape of a torch model.

    runner = OnnxRunner("model.onnx")                   # graph optimizations: ORT_ENABLE_ALL
    transform = runner.preprocess.transform()           # PIL image -> [C, H, W], from the file's metadata
    logits = runner(batch)                              # [B, C, H, W] float tensor -> [B, K] float tensor

It has the attributes `evaluate` / `predict` use from a runner (`source`, `classes`,
`named_classes`, `preprocess`, `__call__`) plus `metadata` (the ONNX metadata_props).
`swinkit export onnx` stores the preprocessing and class names there (`swinkit_preprocess`,
`swinkit_classes`, as in a safetensors checkpoint) and `swinkit quantize` keeps them.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..metadata import META_PRECISION, META_QUANTIZATION, Preprocess, classes_from_metadata, config_from_metadata
from ..models.registry import SwinConfig
from ..weights.io import CheckpointError

BF16_ON_CPU = ("ONNX Runtime's CPU provider has no bf16 kernels (Conv, Gemm, MatMul, Add), so a bf16 graph runs only "
               "on the CUDA provider (onnxruntime-gpu)")


def session_options(threads: int | None = None):
    """ORT session options: every graph optimization on, `threads` intra-op threads (None: ORT's default),
    denormals flushed to zero. The shifted-window mask (-100) makes softmax return ~1e-44 (denormal)
    weights; on x86 every float op on them takes a slow path (measured, Swin-T batch 8: attn @ v in the
    shifted blocks 23-29 ms instead of 1-6 ms, softmax 6-9 ms instead of 1-3 ms). Flushed, they are 0.
    ONNX Runtime also sets flush-to-zero on the thread that creates the process's first session (threads
    started after it inherit it): from then on that process computes denormals as 0 (differences below
    1e-38).

    ORT's worker threads spin while a run lasts (waking them costs more than spinning) and, by default, go
    on spinning after it returns, taking a core from whatever the process does next. Measured here
    (2 threads, Swin-T): swinkit's PyTorch fast path right after an ORT run took 119.8-139.4 ms at batch 1
    against 78-84 ms alone, still 100 ms 20 ms after the run, while ORT itself ran no slower with the
    spinning stopped at the end of each run (`session.force_spinning_stop`: 84.9 vs 90.6 ms; spinning
    off altogether made it 1.3x slower). So every session stops spinning when its run returns."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def create_session(path: str | os.PathLike, *, threads: int | None = None, providers: list[str] | None = None):
    """An ONNX Runtime session for `path` with graph optimizations on (CPU unless `providers` says otherwise)."""
    import onnxruntime as ort
    try:
        return ort.InferenceSession(str(path), session_options(threads),
                                    providers=providers or ["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own exception types for unreadable or invalid graphs
        hint = ""
        if "CUDAExecutionProvider" not in (providers or []) and _precision_of(path) == "bf16":
            hint = f" (a bf16 export: {BF16_ON_CPU}; use --device cuda)"
        raise CheckpointError(f"'{path}' cannot be loaded by ONNX Runtime: {error}{hint}") from None


def _precision_of(path: str | os.PathLike) -> str | None:
    """`swinkit_precision` of an ONNX file (None when it cannot be read or does not say)."""
    try:
        import onnx
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # the file is already known to be unusable; this only adds a hint
        return None
    return next((prop.value for prop in proto.metadata_props if prop.key == META_PRECISION), None)


class OnnxRunner:
    """An `.onnx` classifier in ONNX Runtime: `[B, C, H, W]` float tensor -> logits `[B, K]` float tensor (on CPU).

    `device="cuda"` selects ONNX Runtime's CUDA provider (onnxruntime-gpu); default CPU.
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, providers: list[str] | None = None,
                 device: str | None = None):
        path = Path(path).expanduser()
        if providers is None and device is not None and str(device).startswith("cuda"):
            import onnxruntime as ort
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise CheckpointError(f"'{path}': device {device} needs onnxruntime-gpu (CUDAExecutionProvider)")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if not path.is_file():
            raise CheckpointError(f"ONNX file '{path}' does not exist")
        self.source = str(path)
        self.session = create_session(path, threads=threads, providers=providers)
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        # fp32 / fp16 / bf16 compute (inputs and outputs are fp32 either way), int8 after `quantize`
        self.precision = "int8" if META_QUANTIZATION in self.metadata else self.metadata.get(META_PRECISION, "fp32")
        config = config_from_metadata(self.metadata, source=str(path))
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self.input_shape = list(inputs[0].shape)  # ints where fixed, names where dynamic
        if config is None and all(isinstance(side, int) for side in self.input_shape[1:]):
            config = SwinConfig(img_size=tuple(self.input_shape[2:]), in_chans=self.input_shape[1])
        self.preprocess = Preprocess.from_metadata(self.metadata, config, source=self.source)
        num_classes = outputs[0].shape[-1]
        if not isinstance(num_classes, int):
            num_classes = config.num_classes if config is not None else 0
        self.classes, self.named_classes = classes_from_metadata(self.metadata, num_classes, source=self.source)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.session.run([self.output_name], {self.input_name: array})[0])

    def __repr__(self) -> str:
        return f"OnnxRunner('{self.source}', input {self.input_shape}, {len(self.classes)} classes)"
