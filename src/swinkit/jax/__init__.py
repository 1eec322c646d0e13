"""swinkit in JAX: the same Swin v1/v2 models and checkpoints in Flax NNX, trained with jit.

    import swinkit.jax as sj
    model = sj.create_model("swin_tiny_patch4_window7_224", pretrained="any_layout.pth")
    logits = model(images)                      # NHWC float32
    sj.save_weights(model, "model.safetensors")  # swinkit's native file; swinkit.create_model reads it

Importing `swinkit` never imports JAX; this subpackage needs the `jax` extra
(`pip install swinkit[jax]`).
"""
from .api import create_model, from_torch, predict, save_weights, to_torch
from .model import SwinTransformer

__all__ = ["SwinTransformer", "create_model", "from_torch", "predict", "save_weights", "to_torch"]
