"""Training: config, loop, optimizer and schedule, exact resume, distributed (DDP / FSDP)."""
from .config import ConfigError, TrainConfig, load_config, save_config
from .evaluate import evaluate_model
from .trainer import build_model, train

__all__ = ["ConfigError", "TrainConfig", "build_model", "evaluate_model", "load_config", "save_config", "train"]
