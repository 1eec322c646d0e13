"""The checkpoint contract: the string entries swinkit stores next to weights, and how they are read.

A swinkit `.safetensors` (header metadata) or `.onnx` (`metadata_props`) file may carry

    swinkit_config        JSON `SwinConfig.to_dict()`: the file alone rebuilds its model
    swinkit_name          the registered variant name, when it has one
    format                "pt" (safetensors' own convention, which transformers reads)
    swinkit_classes       JSON list of class names, in output-index order
    swinkit_preprocess    JSON {"img_size": [h, w], "in_chans", "mean", "std", "crop_pct", "interpolation"}
    swinkit_weights       training: which weights these are ("model" or "ema")
    swinkit_step          training: the optimizer step they were saved at
    swinkit_dynamic       ONNX export: the free axes ("batch,hw")
    swinkit_validation    ONNX export: ONNX Runtime vs PyTorch differences per checked size
    swinkit_quantization  INT8: how the file was quantized and calibrated

`api.save_weights` and the trainer write them, `infer` reads them; missing entries fall back
to the model config (size, channels, mean/std) and the official eval transform.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data.transforms import OFFICIAL_CROP_PCT, OFFICIAL_INTERPOLATION, _interpolation, build_eval_transform
from .models.registry import SwinConfig
from .weights.io import CheckpointError, read_safetensors_header

log = logging.getLogger("swinkit")

META_CONFIG = "swinkit_config"
META_NAME = "swinkit_name"
META_FORMAT = "format"
META_CLASSES = "swinkit_classes"
META_PREPROCESS = "swinkit_preprocess"
META_WEIGHTS = "swinkit_weights"
META_STEP = "swinkit_step"
META_DYNAMIC = "swinkit_dynamic"
META_VALIDATION = "swinkit_validation"
META_QUANTIZATION = "swinkit_quantization"
META_PRECISION = "swinkit_precision"  # an ONNX export's compute dtype: fp32, fp16, bf16 (absent: fp32)

# What every safetensors file swinkit writes says about itself (peer layouts get only this).
FORMAT_ENTRY = {META_FORMAT: "pt"}


def model_entries(config: SwinConfig, name: str | None = None) -> dict[str, str]:
    """{config, format, name}: what lets a file alone recreate its model."""
    entries = {META_CONFIG: json.dumps(config.to_dict()), **FORMAT_ENTRY}
    if name:
        entries[META_NAME] = name
    return entries


def config_from_metadata(metadata: Mapping[str, str], *, source: str = "the checkpoint") -> SwinConfig | None:
    """The `SwinConfig` stored in `swinkit_config`, or None when the file has none."""
    if META_CONFIG not in metadata:
        return None
    try:
        config = SwinConfig.from_dict(json.loads(metadata[META_CONFIG]))
        config.check_limits()  # before anything is built from it
    except (ValueError, TypeError, RecursionError) as error:
        raise CheckpointError(f"'{source}' has invalid {META_CONFIG} metadata: {error}") from None
    return config


# The largest image side preprocessing may produce, after the resize to img_size / crop_pct (a file's
# `swinkit_preprocess` must not make every image cost gigabytes).
MAX_RESIZE_SIDE = 8192


def _side(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"img_size must hold integers, got {value!r}")
    if not 1 <= value <= MAX_RESIZE_SIDE:
        raise ValueError(f"img_size {value} is outside [1, {MAX_RESIZE_SIDE}]")
    return value


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (str, bytes)) or not isinstance(size, (int, Sequence)):
        raise TypeError(f"img_size must be an integer or [height, width], got {size!r}")
    if isinstance(size, int):
        return (_side(size), _side(size))
    if len(size) != 2:
        raise ValueError(f"img_size must be an integer or [height, width], got {list(size)}")
    height, width = (_side(side) for side in size)
    return (height, width)


def _numbers(values, name: str) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise TypeError(f"{name} must be a non-empty list of numbers, got {values!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise TypeError(f"{name} must hold finite numbers, got {list(values)!r}")
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class Preprocess:
    """The eval-time image preparation a model expects: resize to img_size / crop_pct, centre crop
    to `img_size` ([h, w]), convert to `in_chans` channels, normalise with mean/std."""

    img_size: tuple[int, int]
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = OFFICIAL_CROP_PCT
    interpolation: str = OFFICIAL_INTERPOLATION

    def __post_init__(self):
        object.__setattr__(self, "img_size", _pair(self.img_size))
        object.__setattr__(self, "mean", _numbers(self.mean, "mean"))
        object.__setattr__(self, "std", _numbers(self.std, "std"))
        if 0.0 in self.std:
            raise ValueError(f"std must not hold zeros, got {list(self.std)}")
        if isinstance(self.in_chans, bool) or not isinstance(self.in_chans, int) or not 1 <= self.in_chans <= 1024:
            raise ValueError(f"in_chans must be an integer in [1, 1024], got {self.in_chans!r}")
        if isinstance(self.crop_pct, bool) or not isinstance(self.crop_pct, (int, float)):
            raise TypeError(f"crop_pct must be a number, got {self.crop_pct!r}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if max(self.img_size) / self.crop_pct > MAX_RESIZE_SIDE:
            raise ValueError(f"img_size {list(self.img_size)} with crop_pct {self.crop_pct} resizes images to more "
                             f"than {MAX_RESIZE_SIDE} pixels a side")
        if not isinstance(self.interpolation, str):
            raise TypeError(f"interpolation must be a name such as 'bicubic', got {self.interpolation!r}")
        _interpolation(self.interpolation)  # an unknown name fails here, not at the first image

    @property
    def resize_side(self) -> int:
        """The longest side the eval resize produces (img_size / crop_pct): a larger image may be decoded at
        a reduced size down to this (`data.load_image(min_side=...)`) without changing what the model sees."""
        return max(math.floor(side / self.crop_pct) for side in self.img_size)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], model_config: SwinConfig | None = None, *,
                      source: str = "the checkpoint") -> "Preprocess":
        """Read `swinkit_preprocess` from checkpoint metadata; what it lacks comes from `model_config`
        (img_size, in_chans, mean, std) and the official crop 0.875 / bicubic.

        The model's channel count wins over the metadata's: it is what the weights take.
        """
        base = model_config or SwinConfig()
        values: dict[str, Any] = dict(img_size=base.img_size, in_chans=base.in_chans, mean=base.mean, std=base.std)
        raw = metadata.get(META_PREPROCESS)
        if raw:
            try:
                stored = json.loads(raw)
                if not isinstance(stored, dict):
                    raise ValueError(f"expected a JSON object, got {type(stored).__name__}")
            except ValueError as error:
                raise CheckpointError(f"'{source}' has invalid {META_PREPROCESS} metadata: {error}") from None
            fields = {field.name for field in dataclasses.fields(cls)}
            values.update({key: value for key, value in stored.items() if key in fields and value is not None})
        if model_config is not None and values["in_chans"] != model_config.in_chans:
            log.warning("%s: metadata says %s input channels but the model takes %s; using %s", source,
                        values["in_chans"], model_config.in_chans, model_config.in_chans)
            values["in_chans"] = model_config.in_chans
        try:
            return cls(**values)
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"'{source}' has invalid {META_PREPROCESS} metadata {raw}: {error}") from None

    def replace(self, **changes) -> "Preprocess":
        """A copy with the given fields changed; None values are ignored (unset CLI flags)."""
        return dataclasses.replace(self, **{key: value for key, value in changes.items() if value is not None})

    def transform(self) -> Callable:
        """PIL image -> float tensor [in_chans, H, W] (`data.build_eval_transform`)."""
        height, width = self.img_size
        # A square size resizes the shorter side and keeps the aspect ratio, as the official eval does.
        size: int | tuple[int, int] = height if height == width else self.img_size
        return build_eval_transform(size, self.mean, self.std, crop_pct=self.crop_pct,
                                    interpolation=self.interpolation, in_chans=self.in_chans)

    def to_metadata(self) -> dict[str, str]:
        """{`swinkit_preprocess`: JSON}, to store next to the weights."""
        return {META_PREPROCESS: json.dumps(dataclasses.asdict(self))}


def classes_from_metadata(metadata: Mapping[str, str], num_classes: int, *,
                          source: str = "the checkpoint") -> tuple[list[str], bool]:
    """(class names in output-index order, whether the checkpoint named them).

    Without `swinkit_classes` the names are the index strings "0", "1", ...
    """
    raw = metadata.get(META_CLASSES)
    if not raw:
        return [str(index) for index in range(num_classes)], False
    try:
        names = json.loads(raw)
    except ValueError as error:
        raise CheckpointError(f"'{source}' has invalid {META_CLASSES} metadata: {error}") from None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise CheckpointError(f"'{source}' has invalid {META_CLASSES} metadata: expected a JSON list of strings")
    if len(names) != num_classes:
        raise CheckpointError(f"'{source}' names {len(names)} classes but its classifier has {num_classes} outputs")
    return names, True


def read_metadata(path: Path) -> dict[str, str]:
    """A checkpoint's string metadata without loading its tensors (only safetensors headers carry any)."""
    if path.is_dir():
        path = path / "model.safetensors"
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    return read_safetensors_header(path)[1]
