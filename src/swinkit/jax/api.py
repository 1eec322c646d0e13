"""Build, load and save the Flax model through swinkit's one loader and one writer.

Loading goes: any file `swinkit.create_model` takes -> the PyTorch model (layout detection,
resizing on load, head adaptation, initialisation) -> its state dict -> `convert.load_state_dict`.
Saving goes the other way into `api.write_layout`, so a checkpoint moves between the two
frameworks with the same keys and metadata.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import jax
import torch
from flax import nnx

from .. import api as torch_api
from ..models.swin import SwinTransformer as TorchSwinTransformer
from . import convert
from .model import SwinTransformer


def from_torch(torch_model: TorchSwinTransformer, *, seed: int = 0) -> SwinTransformer:
    """The Flax twin of a PyTorch `SwinTransformer`: same config, name and weights; in eval mode.
    `seed` seeds the dropout / drop-path streams used in train mode."""
    model = SwinTransformer(torch_model.config, torch_model.name, rngs=nnx.Rngs(seed))
    convert.load_state_dict(model, torch_model.state_dict(), source=f"the PyTorch {torch_model.name or 'model'}")
    model.eval()
    return model


def create_model(name: str | None = None, *, pretrained: str | Path | None = None, seed: int = 0,
                 **overrides) -> SwinTransformer:
    """`swinkit.create_model` for JAX: a registered variant (or the one a checkpoint describes) with
    weights from `pretrained` in any layout (resized as needed), or the PyTorch initialisation.

    Takes the same keywords (`num_classes`, `img_size`, `window_size`, `in_chans`, `drop_path_rate`,
    SwinConfig fields). The model starts in eval mode (no dropout or drop path); `model.train()`
    switches them on, with random streams seeded by `seed`.
    """
    return from_torch(torch_api.create_model(name, pretrained=pretrained, **overrides), seed=seed)


@nnx.jit
def predict(model: SwinTransformer, images: jax.Array) -> jax.Array:
    """`model(images)` compiled (once per model structure and input shape): `[B, H, W, C]` -> `[B, classes]`.
    In train mode it draws dropout / drop-path masks and advances the model's random streams."""
    return model(images)


def to_torch(model: SwinTransformer) -> TorchSwinTransformer:
    """The PyTorch twin of a Flax model (same config, name and weights)."""
    torch_model = TorchSwinTransformer(model.config, name=model.name)
    torch_model.load_state_dict(convert.state_dict(model))
    return torch_model


def save_weights(model: SwinTransformer, path: str | Path, *, layout: str = "native",
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Write the model's weights as `swinkit.save_weights` does (native: safetensors with the config
    metadata; other layouts: the peer's file form), atomically."""
    native: dict[str, torch.Tensor] = convert.state_dict(model)
    return torch_api.write_layout(native, path, layout, model.config, torch_api.model_metadata(model, metadata))
