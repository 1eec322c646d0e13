"""swinkit: Swin Transformer v1/v2 image classifiers — one model, every checkpoint layout."""
from .api import LoadReport, convert_checkpoint, create_model, create_simmim, load_weights, save_weights
from .infer.optimize import optimize_for_inference
from .models import SwinConfig, SwinTransformer, UnknownModelError, get_config, list_models
from .weights.io import CheckpointError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "LoadReport", "SwinConfig", "SwinTransformer", "UnknownModelError",
           "convert_checkpoint", "create_model", "create_simmim", "get_config", "list_models", "load_weights",
           "optimize_for_inference", "save_weights"]
