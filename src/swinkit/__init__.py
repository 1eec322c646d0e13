"""swinkit: Swin Transformer v1/v2 image classifiers — one model, every checkpoint layout."""
import os

# Large CPU tensors on transparent huge pages: 512x fewer page faults for training's fresh
# activation memory (PyTorch reads this at its first allocation, so it only takes effect when
# swinkit is imported before torch, as the `swinkit` command does). THP_MEM_ALLOC_ENABLE=0 opts out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .api import LoadReport, convert_checkpoint, create_model, load_weights, save_weights
from .infer.fast import optimize_for_inference
from .models import SwinConfig, SwinTransformer, UnknownModelError, get_config, list_models
from .weights.io import CheckpointError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "LoadReport", "SwinConfig", "SwinTransformer", "UnknownModelError",
           "convert_checkpoint", "create_model", "get_config", "list_models", "load_weights",
           "optimize_for_inference", "save_weights"]
