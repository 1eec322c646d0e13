"""Swin Transformer v1/v2 model code: layers, attention, backbone and the variant registry."""
from .registry import MODELS, STANDARD_MODELS, SwinConfig, UnknownModelError, get_config, list_models
from .swin import SwinTransformer

__all__ = ["MODELS", "STANDARD_MODELS", "SwinConfig", "SwinTransformer", "UnknownModelError", "get_config",
           "list_models"]
