"""Peer implementations of the same architecture, built from a swinkit config for speed comparisons.

Each builder returns a callable `images -> logits` or raises `PeerUnavailable` with a reason
the benchmark prints (package missing, variant it does not have, export failure). Peers get
random weights: only their speed is measured, and the architectures are identical.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..models.registry import SwinConfig


class PeerUnavailable(RuntimeError):
    """A peer that cannot run here; the message says why."""


# torchvision has only the three smallest variants of each version, at their native size.
TORCHVISION_BUILDERS = {
    "swin_tiny_patch4_window7_224": "swin_t", "swin_small_patch4_window7_224": "swin_s",
    "swin_base_patch4_window7_224": "swin_b", "swinv2_tiny_window8_256": "swin_v2_t",
    "swinv2_small_window8_256": "swin_v2_s", "swinv2_base_window8_256": "swin_v2_b",
}


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise PeerUnavailable(f"{module} is not installed") from None


def timm_model(config: SwinConfig) -> torch.nn.Module:
    """timm's SwinTransformer / SwinTransformerV2 with `config`'s architecture, eval mode."""
    _require("timm")
    from timm.models import swin_transformer, swin_transformer_v2
    kwargs = dict(img_size=config.img_size, patch_size=config.patch_size, in_chans=config.in_chans,
                  num_classes=config.num_classes, embed_dim=config.embed_dim, depths=config.depths,
                  num_heads=config.num_heads, window_size=config.window_size, mlp_ratio=config.mlp_ratio,
                  qkv_bias=config.qkv_bias, drop_path_rate=config.drop_path_rate)  # drop path acts in train mode only
    try:
        if config.version == 1:
            model = swin_transformer.SwinTransformer(**kwargs)
        else:
            model = swin_transformer_v2.SwinTransformerV2(
                pretrained_window_sizes=tuple(config.pretrained_window_sizes), **kwargs)
    except Exception as error:
        raise PeerUnavailable(f"timm cannot build this configuration: {error}") from None
    return model.eval()


def timm_eager(config: SwinConfig, example: torch.Tensor) -> Callable:
    return timm_model(config)


def timm_jit(config: SwinConfig, example: torch.Tensor) -> Callable:
    """`torch.jit.trace` of timm's model (FasterTransformer's baseline), traced at the example's shape."""
    model = timm_model(config)
    import warnings
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        try:
            return torch.jit.trace(model, example)
        except Exception as error:
            raise PeerUnavailable(f"torch.jit.trace failed on timm's model: {error}") from None


def torchvision_model(name: str | None, config: SwinConfig, example: torch.Tensor) -> Callable:
    _require("torchvision")
    import torchvision
    builder = TORCHVISION_BUILDERS.get(name or "")
    if builder is None or tuple(example.shape[2:]) != config.img_size:
        raise PeerUnavailable(f"torchvision has no {name or 'custom'} variant at {tuple(example.shape[2:])} "
                              f"(it has {', '.join(TORCHVISION_BUILDERS.values())} at their native sizes)")
    return getattr(torchvision.models, builder)(weights=None, num_classes=config.num_classes).eval()


def hf_model(config: SwinConfig, example: torch.Tensor) -> Callable:
    """transformers' SwinForImageClassification / Swinv2ForImageClassification, returning logits."""
    _require("transformers")
    import transformers
    from ..weights.layouts import hf_config
    settings = hf_config(config)
    settings.pop("architectures", None)
    settings.pop("model_type", None)
    if config.version == 1:
        model = transformers.SwinForImageClassification(transformers.SwinConfig(**settings))
    else:
        model = transformers.Swinv2ForImageClassification(transformers.Swinv2Config(**settings))
    model.eval()

    def run(images: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=images).logits
    return run


def timm_onnxruntime(config: SwinConfig, example: torch.Tensor, workdir: Path, threads: int | None) -> Callable:
    """ONNX Runtime (graph optimizations on) running timm's own ONNX export, batch dynamic."""
    _require("onnxruntime")
    model = timm_model(config)
    path = Path(workdir) / "timm.onnx"
    try:
        with torch.no_grad():
            torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=18, input_names=["images"],
                              output_names=["logits"], external_data=False, verbose=False,
                              dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}})
    except Exception as error:
        raise PeerUnavailable(f"timm's model does not export to ONNX: {str(error).splitlines()[0]}") from None
    from ..infer.onnx_runner import OnnxRunner
    return OnnxRunner(path, threads=threads)
