"""`swinkit eval` / `swinkit predict` with `--backend jax`: a runner (see `infer/runner.py`) whose
logits come from the Flax model. Loading, class names and preprocessing are PyTorch's `load_runner`
reading the same file; only the model call differs."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from ..infer.runner import load_classifier
from ..weights.io import CheckpointError
from .api import from_torch
from .steps import apply_precision


class JaxRunner:
    """Normalised images `[B, C, H, W]` (torch) -> logits `[B, K]` (torch, float32) from the Flax model.
    Batches are padded up to the largest batch seen, so a short last batch does not recompile."""

    def __init__(self, model, preprocess, classes: list[str], *, named_classes: bool = True, source: str = "<model>"):
        model.eval()
        self.model = model
        self.preprocess, self.classes, self.named_classes, self.source = preprocess, classes, named_classes, source
        graphdef, self.state = nnx.split(self.model)
        self._forward = jax.jit(lambda state, images: nnx.merge(graphdef, state)(images).astype(jnp.float32))
        self._batch = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch = images.shape[0]
        self._batch = max(self._batch, batch)
        x = images.permute(0, 2, 3, 1).float().numpy()
        if batch < self._batch:
            x = np.concatenate([x, np.zeros((self._batch - batch, *x.shape[1:]), x.dtype)])
        return torch.from_numpy(np.asarray(self._forward(self.state, x))[:batch].copy())


def load_jax_runner(weights: str | Path, *, model_name: str | None = None, precision: str = "fp32") -> JaxRunner:
    """Weights file (any layout `swinkit.create_model` takes) -> a `JaxRunner` with the checkpoint's class names
    and preprocessing, read as `infer.runner.load_runner` reads them. "bf16-mixed" runs the matmuls in bf16."""
    path = Path(weights).expanduser()
    if not path.exists():
        raise CheckpointError(f"weights file '{path}' does not exist")
    if path.suffix == ".onnx":
        raise CheckpointError(f"'{path}' is an ONNX graph; the JAX backend runs checkpoints (use --backend torch)")
    torch_model, preprocess, classes, named = load_classifier(path, model_name)
    model = apply_precision(from_torch(torch_model), precision)
    return JaxRunner(model, preprocess, classes, named_classes=named, source=str(path))
