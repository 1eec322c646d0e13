"""Runners: a weights file turned into "normalised image batch -> logits", plus what it needs.

`evaluate` and `predict` never touch a model directly; they do

    runner = load_runner(weights, model_name=..., device=...)   # once
    transform = runner.preprocess.transform()                   # PIL image -> [C, H, W]
    logits = runner(batch)                                      # [B, C, H, W] -> [B, K]

so another engine (ONNX Runtime for an `.onnx` file) only has to provide an object with
the same four attributes (`source`, `classes`, `preprocess`, `__call__`) and a branch in
`load_runner`.

A checkpoint says how its images were prepared in two safetensors metadata entries,
written by the trainer and read here:

    swinkit_classes     JSON list of class names, in output-index order
    swinkit_preprocess  JSON {"img_size": [h, w], "in_chans", "mean", "std", "crop_pct", "interpolation"}

Missing entries fall back to the model config (size, channels, mean/std) and the
official eval transform (resize to size / 0.875, bicubic, centre crop).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .. import api
from ..data import build_eval_transform
from ..models.registry import SwinConfig
from ..weights.io import CheckpointError

log = logging.getLogger("swinkit")

META_CLASSES = "swinkit_classes"
META_PREPROCESS = "swinkit_preprocess"

OFFICIAL_CROP_PCT = 0.875
OFFICIAL_INTERPOLATION = "bicubic"


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    height, width = (int(side) for side in size)
    return (height, width)


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
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")

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


class Runner(Protocol):
    """What evaluate/predict need from an inference engine."""

    source: str                 # the weights file, for messages
    classes: list[str]          # class names in output-index order
    named_classes: bool         # True when the names came from the checkpoint (not index strings)
    preprocess: Preprocess

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, in_chans, H, W] float32 -> logits [B, num_classes] float32."""


class TorchRunner:
    """A swinkit model in eval mode on one device; calls run under `torch.inference_mode`."""

    def __init__(self, model: torch.nn.Module, preprocess: Preprocess, classes: list[str], *,
                 named_classes: bool = True, device: str | torch.device | None = None, source: str = "<model>"):
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.eval().to(self.device)
        self.preprocess = preprocess
        self.classes = classes
        self.named_classes = named_classes
        self.source = source

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(images.to(self.device, non_blocking=True)).float()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_runner(weights: str | Path, *, model_name: str | None = None,
                device: str | torch.device | None = None) -> Runner:
    """Weights file -> runner. A swinkit safetensors rebuilds its own model; any other layout
    needs `model_name`. Raises `CheckpointError` naming the file when it cannot be used."""
    path = Path(weights).expanduser()
    if not path.exists():
        raise CheckpointError(f"weights file '{path}' does not exist")
    if path.suffix == ".onnx":
        from .onnx_runner import OnnxRunner  # ONNX Runtime: FP32 or INT8 exports, same preprocessing
        return OnnxRunner(path, device=device)
    model = api.create_model(model_name, pretrained=path)
    if model.num_classes == 0:
        raise CheckpointError(f"'{path}' has no classifier head (num_classes 0); it cannot classify images")
    metadata = read_metadata(path)
    preprocess = Preprocess.from_metadata(metadata, model.config, source=str(path))
    classes, named = classes_from_metadata(metadata, model.num_classes, source=str(path))
    return TorchRunner(model, preprocess, classes, named_classes=named, device=device, source=str(path))


def with_preprocess(runner: Runner, preprocess: Preprocess | Mapping[str, Any] | None) -> Runner:
    """`runner` with its preprocessing replaced (a `Preprocess`) or partly changed (a mapping of fields).

    The caller's runner is left as it was: a shallow copy (sharing the model) gets the change."""
    if isinstance(preprocess, Preprocess):
        changed = preprocess
    elif preprocess and any(value is not None for value in preprocess.values()):
        changed = runner.preprocess.replace(**preprocess)
    else:
        return runner
    runner = copy.copy(runner)
    runner.preprocess = changed
    return runner


def read_metadata(path: Path) -> dict[str, str]:
    """A checkpoint's string metadata without loading its tensors (only safetensors headers carry any)."""
    if path.is_dir():
        path = path / "model.safetensors"
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:  # create_model has read this file already; keep the message anyway
        raise CheckpointError(f"'{path}' is truncated or corrupt ({error})") from error
