"""Inference: evaluate and predict from a weights file or an `.onnx` file; the frozen fast
path (`optimize.optimize_for_inference`, `fast.FastSwin`, `int8.py`), ONNX export (`export.py`), ONNX Runtime
(`onnx_runner.py`) and INT8 post-training quantization with calibration (`quantize.py`).

Every entry point goes `load_runner(weights)` -> batches through the runner, so another
engine only adds a runner (see `runner.py`). What a checkpoint says about its classes and
preprocessing is read by `swinkit.metadata`.
"""
from ..metadata import Preprocess
from .evaluate import evaluate
from .predict import predict
from .runner import Runner, TorchRunner, load_runner

__all__ = ["Preprocess", "Runner", "TorchRunner", "evaluate", "load_runner", "predict"]
