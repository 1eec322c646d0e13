"""Variant table: every model name maps to a `SwinConfig`, kept here as data.

This is the single source of truth for a variant's dims, depths, heads, window
and image size. Everything else (builders, converters, the CLI) reads it.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
import numbers
import operator
from dataclasses import dataclass

from ..errors import SwinkitError


def shift_size(size, window: int):
    """THE shift rule: the odd blocks of a stage shift by window // 2 along an axis where the
    (unpadded) map is larger than the window, else 0. `size` may be an int or a 0-d tensor
    (an ONNX export computes it from the input's shape); the result is of the same kind."""
    return (size > window) * (window // 2)


class UnknownModelError(SwinkitError, ValueError):
    """A model name that is not in the registry."""


@dataclass(frozen=True)
class SwinConfig:
    """Everything needed to build a Swin Transformer v1 or v2.

    `window_size` is the configured window; each stage clamps it to its own
    resolution at build time (see `stage_windows`), as the official code does.
    """

    version: int = 1  # 1: pre-norm + bias table; 2: post-norm + cosine attention + log-CPB
    img_size: tuple[int, int] = (224, 224)
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    pretrained_window_sizes: tuple[int, ...] = (0, 0, 0, 0)  # v2 only; 0 = same as window
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    patch_norm: bool = True
    # Absolute position embedding (official `ape`): a learned [1, patches, embed_dim] table added to the
    # patch embeddings, resized bicubically for other input sizes. No published variant uses it.
    ape: bool = False
    # Preprocessing the weights expect; stored in checkpoint metadata.
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def __post_init__(self):
        self._check_types()
        if len(self.img_size) == 1:
            object.__setattr__(self, "img_size", self.img_size * 2)
        if len(self.img_size) != 2:
            raise ValueError(f"SwinConfig.img_size must be one size or [height, width], got {list(self.img_size)}")
        if not self.depths:
            raise ValueError("SwinConfig.depths must name at least one stage")
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "window_size", "depths", "num_heads"):
            value = getattr(self, name)
            if min(value if isinstance(value, tuple) else (value,)) < 1:
                raise ValueError(f"SwinConfig.{name} must be positive, got {value}")
        if self.num_classes < 0 or min(self.pretrained_window_sizes, default=0) < 0:
            raise ValueError("SwinConfig.num_classes and pretrained_window_sizes must not be negative")
        if not self.mlp_ratio > 0:
            raise ValueError(f"SwinConfig.mlp_ratio must be positive, got {self.mlp_ratio}")
        if len(self.pretrained_window_sizes) != len(self.depths):
            pws = self.pretrained_window_sizes
            object.__setattr__(self, "pretrained_window_sizes",
                               (tuple(pws) + (0,) * len(self.depths))[: len(self.depths)])
        if self.version not in (1, 2):
            raise ValueError(f"SwinConfig.version must be 1 or 2, got {self.version}")
        if len(self.num_heads) != len(self.depths):
            raise ValueError(f"SwinConfig: depths {self.depths} and num_heads {self.num_heads} "
                             "must have the same length")
        for i, heads in enumerate(self.num_heads):
            if (self.embed_dim * 2 ** i) % heads:
                raise ValueError(f"SwinConfig: stage {i} dim {self.embed_dim * 2 ** i} is not "
                                 f"divisible by {heads} heads")

    def _check_types(self) -> None:
        """Normalise every field to its declared type (ints, tuples of ints, floats, bools), or raise
        TypeError naming the field: a config read from a file may hold anything."""
        for name, kind in _FIELD_KINDS.items():
            value = getattr(self, name)
            if kind in ("ints", "floats"):
                if isinstance(value, (str, bytes)) or not isinstance(value, (numbers.Number, tuple, list)):
                    raise TypeError(f"SwinConfig.{name} must be a list of numbers, got {value!r}")
                items = (value,) if isinstance(value, numbers.Number) else tuple(value)
                convert = _as_int if kind == "ints" else _as_float
                value = tuple(convert(name, item) for item in items)
            elif kind == "int":
                value = _as_int(name, value)
            elif kind == "float":
                value = _as_float(name, value)
            elif not isinstance(value, bool):
                raise TypeError(f"SwinConfig.{name} must be true or false, got {value!r}")
            object.__setattr__(self, name, value)

    def check_limits(self) -> None:
        """Raise ValueError when the config is beyond `LIMITS`: what a file (checkpoint metadata,
        a Hugging Face config.json) may ask swinkit to build before any memory is spent on it."""
        def refuse(what, value, limit):
            raise ValueError(f"SwinConfig.{what} {value} is above swinkit's limit of {limit}")
        for name in ("patch_size", "in_chans", "num_classes", "embed_dim", "window_size", "mlp_ratio"):
            if getattr(self, name) > LIMITS[name]:
                refuse(name, getattr(self, name), LIMITS[name])
        for name, limit in (("img_size", LIMITS["img_size"]), ("num_heads", LIMITS["num_heads"]),
                            ("depths", LIMITS["depth"]), ("pretrained_window_sizes", LIMITS["window_size"])):
            if max(getattr(self, name)) > limit:
                refuse(name, list(getattr(self, name)), limit)
        if self.num_stages > LIMITS["stages"]:
            refuse("depths", f"({self.num_stages} stages)", f"{LIMITS['stages']} stages")
        if sum(self.depths) > LIMITS["blocks"]:
            refuse("depths", f"({sum(self.depths)} blocks)", f"{LIMITS['blocks']} blocks")
        if self.num_features > LIMITS["stage_dim"]:
            refuse("embed_dim", f"{self.embed_dim} (last stage {self.num_features} wide)", LIMITS["stage_dim"])
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"SwinConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        # Buffers built from the window alone (no weights back them): a relative position index of
        # window^4 int64 per block, and v2's coordinate table.
        buffer_bytes = sum(depth * (window ** 4 * 8 + (2 * window - 1) ** 2 * 8)
                           for depth, window in zip(self.depths, self.stage_windows()))
        if buffer_bytes > LIMITS["buffer_bytes"]:
            refuse("window_size", f"{self.window_size} (window buffers of {buffer_bytes / 2 ** 30:.1f} GiB)",
                   f"{LIMITS['buffer_bytes'] // 2 ** 30} GiB")

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def num_features(self) -> int:
        return self.embed_dim * 2 ** (self.num_stages - 1)

    def stage_dims(self) -> list[int]:
        return [self.embed_dim * 2 ** i for i in range(self.num_stages)]

    def stage_resolutions(self, img_size: tuple[int, int] | None = None) -> list[tuple[int, int]]:
        """Feature-map size of each stage for an input of `img_size` (after padding rules)."""
        height, width = img_size or self.img_size
        height = -(-height // self.patch_size)
        width = -(-width // self.patch_size)
        sizes = []
        for i in range(self.num_stages):
            if i > 0:
                height, width = -(-height // 2), -(-width // 2)
            sizes.append((height, width))
        return sizes

    def patch_grid(self) -> tuple[int, int]:
        """(rows, cols) of patches at `img_size`: the grid the absolute position embedding is learned on."""
        return self.stage_resolutions()[0]

    def stage_windows(self) -> list[int]:
        """Window of each stage: the configured window clamped to the stage resolution at
        `img_size` (official rule: if min(resolution) <= window, window = min(resolution))."""
        windows = []
        for height, width in self.stage_resolutions():
            windows.append(min(height, width) if min(height, width) <= self.window_size
                           else self.window_size)
        return windows

    def stage_shifts(self, img_size: tuple[int, int] | None = None) -> list[tuple[int, int]]:
        """(rows, cols) shift of the odd blocks of each stage at `img_size` (see `shift_size`)."""
        return [(shift_size(height, window), shift_size(width, window))
                for (height, width), window in zip(self.stage_resolutions(img_size), self.stage_windows())]

    def drop_path_rates(self) -> list[float]:
        """Stochastic-depth rate of every block in order: linear in depth from 0 to `drop_path_rate`."""
        total = sum(self.depths)
        return [self.drop_path_rate * i / max(total - 1, 1) for i in range(total)]

    def replace(self, **changes) -> "SwinConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SwinConfig":
        if not isinstance(data, dict):
            raise TypeError(f"SwinConfig: expected a mapping of fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"SwinConfig: unknown keys {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


# How each field is normalised by `SwinConfig._check_types`.
_FIELD_KINDS = {"version": "int", "img_size": "ints", "patch_size": "int", "in_chans": "int", "num_classes": "int",
                "embed_dim": "int", "depths": "ints", "num_heads": "ints", "window_size": "int",
                "pretrained_window_sizes": "ints", "mlp_ratio": "float", "qkv_bias": "bool", "drop_rate": "float",
                "attn_drop_rate": "float", "drop_path_rate": "float", "patch_norm": "bool", "ape": "bool",
                "mean": "floats", "std": "floats"}

# Generous bounds on what a file may ask swinkit to build (`SwinConfig.check_limits`): every published
# variant is far inside them (the largest, SwinV2-G, has embed_dim 512, 42 blocks in a stage, window 48).
LIMITS = {"patch_size": 64, "in_chans": 1024, "num_classes": 1_000_000, "embed_dim": 4096, "stage_dim": 32768,
          "window_size": 64, "mlp_ratio": 64, "img_size": 4096, "num_heads": 1024, "depth": 128, "stages": 8,
          "blocks": 256, "buffer_bytes": 2 ** 30}


def _as_int(name: str, value) -> int:
    if isinstance(value, bool):
        raise TypeError(f"SwinConfig.{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"SwinConfig.{name} must be an integer, got {value!r}") from None


def _as_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"SwinConfig.{name} must be a finite number, got {value!r}")
    return float(value)


_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_S = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_L = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))
_FT = (12, 12, 12, 6)  # pretrained windows of the 192->256/384 fine-tunes

MODELS: dict[str, SwinConfig] = {
    # Swin v1 (official names; window 7 at 224, window 12 at 384)
    "swin_tiny_patch4_window7_224": SwinConfig(version=1, img_size=224, window_size=7, drop_path_rate=0.2, **_T),
    "swin_small_patch4_window7_224": SwinConfig(version=1, img_size=224, window_size=7, drop_path_rate=0.3, **_S),
    "swin_base_patch4_window7_224": SwinConfig(version=1, img_size=224, window_size=7, drop_path_rate=0.5, **_B),
    "swin_base_patch4_window12_384": SwinConfig(version=1, img_size=384, window_size=12, drop_path_rate=0.5, **_B),
    "swin_large_patch4_window7_224": SwinConfig(version=1, img_size=224, window_size=7, drop_path_rate=0.5, **_L),
    "swin_large_patch4_window12_384": SwinConfig(version=1, img_size=384, window_size=12, drop_path_rate=0.5, **_L),
    # Swin v2
    "swinv2_tiny_window8_256": SwinConfig(version=2, img_size=256, window_size=8, drop_path_rate=0.2, **_T),
    "swinv2_tiny_window16_256": SwinConfig(version=2, img_size=256, window_size=16, drop_path_rate=0.2, **_T),
    "swinv2_small_window8_256": SwinConfig(version=2, img_size=256, window_size=8, drop_path_rate=0.3, **_S),
    "swinv2_small_window16_256": SwinConfig(version=2, img_size=256, window_size=16, drop_path_rate=0.3, **_S),
    "swinv2_base_window8_256": SwinConfig(version=2, img_size=256, window_size=8, drop_path_rate=0.5, **_B),
    "swinv2_base_window16_256": SwinConfig(version=2, img_size=256, window_size=16, drop_path_rate=0.5, **_B),
    "swinv2_base_window12_192": SwinConfig(version=2, img_size=192, window_size=12, num_classes=21841,
                                           drop_path_rate=0.2, **_B),
    "swinv2_base_window12to16_192to256": SwinConfig(version=2, img_size=256, window_size=16, drop_path_rate=0.2,
                                                    pretrained_window_sizes=_FT, **_B),
    "swinv2_base_window12to24_192to384": SwinConfig(version=2, img_size=384, window_size=24, drop_path_rate=0.2,
                                                    pretrained_window_sizes=_FT, **_B),
    "swinv2_large_window12_192": SwinConfig(version=2, img_size=192, window_size=12, num_classes=21841,
                                            drop_path_rate=0.2, **_L),
    "swinv2_large_window12to16_192to256": SwinConfig(version=2, img_size=256, window_size=16, drop_path_rate=0.2,
                                                     pretrained_window_sizes=_FT, **_L),
    "swinv2_large_window12to24_192to384": SwinConfig(version=2, img_size=384, window_size=24, drop_path_rate=0.2,
                                                     pretrained_window_sizes=_FT, **_L),
    # Small configs for tests and CPU recipes (not official).
    "swin_nano_patch2_window4_32": SwinConfig(version=1, img_size=32, patch_size=2, window_size=4, embed_dim=32,
                                              depths=(2, 2, 2), num_heads=(1, 2, 4), drop_path_rate=0.0,
                                              num_classes=10),
    "swinv2_nano_patch2_window4_32": SwinConfig(version=2, img_size=32, patch_size=2, window_size=4, embed_dim=32,
                                                depths=(2, 2, 2), num_heads=(1, 2, 4), drop_path_rate=0.0,
                                                num_classes=10),
    "swin_micro_patch4_window7_56": SwinConfig(version=1, img_size=56, window_size=7, embed_dim=32,
                                               depths=(1, 2, 2, 1), num_heads=(1, 2, 4, 8), drop_path_rate=0.0),
    "swinv2_micro_window8_64": SwinConfig(version=2, img_size=64, window_size=8, embed_dim=32,
                                          depths=(1, 2, 2, 1), num_heads=(1, 2, 4, 8), drop_path_rate=0.0),
}

STANDARD_MODELS: tuple[str, ...] = tuple(n for n in MODELS if "nano" not in n and "micro" not in n)


def list_models(pattern: str | None = None) -> list[str]:
    """Names in the registry, sorted; `pattern` is a shell-style wildcard ('swinv2_*')."""
    names = sorted(MODELS)
    if pattern:
        if not any(ch in pattern for ch in "*?["):
            pattern = f"*{pattern}*"
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return names


def get_config(name: str) -> SwinConfig:
    """The registered config for `name`; an unknown name suggests the closest ones."""
    try:
        return MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, MODELS, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see swinkit.list_models()"
        raise UnknownModelError(f"unknown model '{name}'{hint}") from None


def name_for_config(config: SwinConfig) -> str | None:
    """The registered name whose architecture matches `config` (ignoring head/size/regularisation)."""
    ignore = {"num_classes", "img_size", "drop_path_rate", "drop_rate", "attn_drop_rate", "in_chans",
              "mean", "std", "window_size", "pretrained_window_sizes"}
    def arch(c):
        return {k: v for k, v in c.to_dict().items() if k not in ignore}
    want = arch(config)
    for name, candidate in MODELS.items():
        if arch(candidate) == want and candidate.window_size == config.window_size:
            return name
    return None


__all__ = ["SwinConfig", "shift_size", "MODELS", "STANDARD_MODELS", "UnknownModelError", "list_models", "get_config",
           "name_for_config"]
