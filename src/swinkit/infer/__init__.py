"""Inference: evaluate and predict from a weights file (later: frozen fast path, ONNX, INT8).

Every entry point goes `load_runner(weights)` -> batches through the runner, so another
engine only adds a runner (see `runner.py`).
"""
from .evaluate import evaluate
from .predict import predict
from .runner import META_CLASSES, META_PREPROCESS, Preprocess, Runner, TorchRunner, load_runner

__all__ = ["META_CLASSES", "META_PREPROCESS", "Preprocess", "Runner", "TorchRunner", "evaluate", "load_runner",
           "predict"]
