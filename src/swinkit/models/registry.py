"""Variant table: every model name maps to a `SwinConfig`, kept here as data.

This is the single source of truth for a variant's dims, depths, heads, window
and image size. Everything else (builders, converters, the CLI) reads it.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from dataclasses import dataclass


def shift_size(size, window: int):
    """THE shift rule: the odd blocks of a stage shift by window // 2 along an axis where the
    (unpadded) map is larger than the window, else 0. `size` may be an int or a 0-d tensor
    (an ONNX export computes it from the input's shape); the result is of the same kind."""
    return (size > window) * (window // 2)


class UnknownModelError(ValueError):
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
    # Preprocessing the weights expect; stored in checkpoint metadata.
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def __post_init__(self):
        size = self.img_size
        if isinstance(size, int):
            object.__setattr__(self, "img_size", (size, size))
        else:
            object.__setattr__(self, "img_size", tuple(int(s) for s in size))
        for name in ("depths", "num_heads", "pretrained_window_sizes", "mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
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

    def replace(self, **changes) -> "SwinConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SwinConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"SwinConfig: unknown keys {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


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
