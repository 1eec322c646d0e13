"""The training config: a plain dataclass tree, loaded from YAML, overridden by flags and `key=value`.

Defaults are the official Swin ImageNet-1k recipe (AdamW, lr 5e-4 per 512 images, cosine
with 20 warmup epochs, wd 0.05, clip 5, label smoothing 0.1, mixup .8 / cutmix 1.0,
RandAugment m9, random erasing .25). A recipe file under `configs/` only says what differs.

    config = load_config("configs/fashion_mnist.yaml", ["optim.lr=1e-3", "train.batch_size=64"])
    save_config(config, "runs/x/config.yaml")

Every key is type-checked on the way in; an unknown key is an error that names it and,
where one is close, suggests the right spelling.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..data.errors import MAX_BAD_FRACTION
from ..errors import SwinkitError
from ..data.transforms import OFFICIAL_CROP_PCT, OFFICIAL_INTERPOLATION
from ..files import atomic_write
from ..models.registry import SwinConfig
from ..precision import PRECISIONS
STRATEGIES = ("ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(SwinkitError, ValueError):
    """A config file, key or value that cannot be used; the message names it."""


@dataclass
class ModelSection:
    name: str | None = "swin_tiny_patch4_window7_224"  # a registry name; null: `arch` gives the whole SwinConfig
    pretrained: str | None = None  # any checkpoint layout; head / size / window are adapted on load
    arch: dict = field(default_factory=dict)  # SwinConfig fields that override (or, without a name, define) it
    num_classes: int | None = None  # default: the dataset's class count
    img_size: int | None = None
    in_chans: int | None = None
    drop_path_rate: float | None = None  # default: the variant's
    grad_checkpointing: bool = False
    memory_budget: str | None = None  # e.g. "6GB": recompute just enough blocks to fit (train/memory.py)
    lean: bool = True  # the lean training policy (train/lean); false: the plain definition's autograd


@dataclass
class DataSection:
    path: str | None = None  # dataset root with train/ and val/ (image folders)
    synthetic: bool = False  # random images generated per index, no files
    synthetic_train_size: int = 1024
    synthetic_val_size: int = 256
    train_split: str = "train"
    val_split: str | None = "val"  # null: no validation
    workers: int = 4
    cache: bool = False  # decode each split once into memory (uint8); batch-level crop/flip augmentation
    mean: list[float] | None = None  # default: the model config's
    std: list[float] | None = None
    crop_pct: float = OFFICIAL_CROP_PCT  # eval: resize to img_size / crop_pct, centre crop
    interpolation: str = OFFICIAL_INTERPOLATION
    max_bad_fraction: float = MAX_BAD_FRACTION  # abort when more unreadable images than this
    labels_per_class: int | None = None  # few-label fine-tuning: a fixed, seeded, class-balanced training subset


@dataclass
class AugmentSection:
    enabled: bool = True  # false (--no-augment): no random augmentation, mixup or cutmix
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop
    hflip: float = 0.5
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"
    random_erasing: float = 0.25
    crop_padding: int = 4  # cache mode: random crop of a zero-padded image
    mixup: float = 0.8
    cutmix: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1


@dataclass
class OptimSection:
    lr: float = 5e-4  # base lr, per `lr_reference_batch` images when scale_lr
    scale_lr: bool = True  # lr, warmup_lr and min_lr x global_batch * accumulation / lr_reference_batch
    lr_reference_batch: int = 512
    weight_decay: float = 0.05  # not on 1-D params, biases, position tables, logit_scale, cpb_mlp
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: float | None = 5.0  # max global grad norm; null: no clipping
    accumulation_steps: int = 1
    layer_decay: float | None = None  # fine-tuning: each block's lr x decay^(depth from the top); head at full lr


@dataclass
class ScheduleSection:
    epochs: int = 300
    warmup_epochs: float = 20
    warmup_lr: float = 5e-7
    min_lr: float = 5e-6
    max_steps: int | None = None  # stop after this many optimizer steps (the cosine then spans them)


@dataclass
class TrainSection:
    batch_size: int = 128  # per process
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16-mixed | fp16-mixed
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False
    strategy: str = "ddp"  # ddp | fsdp (used when launched with more than one process)
    nproc: int = 1  # >1: relaunch under torchrun with this many processes
    ema: bool = False
    ema_decay: float = 0.9998
    log_every: int = 10  # optimizer steps
    save_every: int = 0  # optimizer steps between checkpoints; 0: at epoch ends only
    val_every: int = 1  # epochs between validations (the last epoch is always validated)
    resume: bool = False


@dataclass
class OutputSection:
    dir: str = "runs/train"
    tensorboard: bool = True
    progress: bool = True  # tqdm bar (off anyway when stderr is not a TTY or CI is set)
    curves: bool = True  # curves.png


@dataclass
class PretrainSection:
    method: str | None = None  # "simmim": masked-image pre-training without labels (`swinkit pretrain`)
    mask_patch_size: int = 32  # pixels per masked square, a multiple of the patch size (official: 32 at 192 px)
    mask_ratio: float = 0.6  # fraction of squares masked per image
    preview_images: int = 8  # images in the per-epoch reconstruction grid (0: none)


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    output: OutputSection = field(default_factory=OutputSection)
    pretrain: PretrainSection = field(default_factory=PretrainSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRETRAIN_METHODS = ("simmim",)
_CHOICES = {"train.precision": PRECISIONS, "train.strategy": STRATEGIES, "train.device": DEVICES,
            "pretrain.method": PRETRAIN_METHODS}
_SWIN_FIELDS = {f.name: f for f in dataclasses.fields(SwinConfig)}
_SWIN_HINTS = typing.get_type_hints(SwinConfig)


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _check_value(value, annotation, key: str):
    """`value` as `annotation` (ints accepted for floats); anything else is a ConfigError naming `key`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(value, option, key)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(annotation)[:1] or (object,)
        return [_check_value(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is object:
        return value
    raise ConfigError(f"config key '{key}' must be {_type_name(annotation)}, got {value!r}")


def _unknown(key: str, known) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, list(known), n=1, cutoff=0.6)
    hint = f" (did you mean '{key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _check_arch(arch: dict, key: str) -> dict:
    """Validate `model.arch`: SwinConfig field names, with list values for tuple fields."""
    out = {}
    for name, value in arch.items():
        if name not in _SWIN_FIELDS:
            raise _unknown(f"{key}.{name}", _SWIN_FIELDS)
        value = list(value) if isinstance(value, tuple) else value
        if name == "img_size" and isinstance(value, int) and not isinstance(value, bool):
            out[name] = value  # one size for both sides
        else:
            out[name] = _check_value(value, _SWIN_HINTS[name], f"{key}.{name}")
    return out


def _set(config: TrainConfig, key: str, value) -> None:
    """Set dotted `key` (section.field or model.arch.field) to a type-checked `value`."""
    parts = key.split(".")
    if len(parts) < 2 or parts[0] not in _hints(TrainConfig):
        raise _unknown(key, _hints(TrainConfig))
    section = getattr(config, parts[0])
    hints = _hints(type(section))
    if parts[1] not in hints:
        raise _unknown(key, hints)
    if len(parts) == 3 and parts[:2] == ["model", "arch"]:
        section.arch = {**section.arch, **_check_arch({parts[2]: value}, "model.arch")}
        return
    if len(parts) != 2:
        raise _unknown(key, hints)
    checked = _check_value(value, hints[parts[1]], key)
    if key in _CHOICES and checked is not None and checked not in _CHOICES[key]:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(_CHOICES[key])}, got {checked!r}")
    if key == "model.arch":
        checked = _check_arch(checked, key)
    setattr(section, parts[1], checked)


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    """{'optim': {'lr': 1}} -> [('optim.lr', 1)]; `model.arch` stays one value."""
    items = []
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and key != "model.arch" and prefix == "":
            items += _flatten(value, f"{key}.")
        else:
            items.append((key, value))
    return items


def apply_mapping(config: TrainConfig, tree: dict, source: str = "config") -> TrainConfig:
    """Apply a nested mapping (a parsed YAML file) onto `config`; errors name `source`."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (model, data, ...), got {type(tree).__name__}")
    for key, value in _flatten(tree):
        if "." not in key:
            raise ConfigError(f"{source}: section '{key}' must be a mapping" if key in _hints(TrainConfig)
                              else f"{source}: {_unknown(key, _hints(TrainConfig))}")
        try:
            _set(config, key, value)
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None
    return config


def parse_override(text: str) -> tuple[str, object]:
    """'optim.lr=1e-3' -> ('optim.lr', 0.001); the value is read as YAML (numbers, lists, null, ...)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. optim.lr=1e-3)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override '{text}': cannot parse the value ({error})") from None
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads '1e-3' as a string
    return key.strip(), value


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# Bounds on a recipe file: recipes are a few kilobytes of shallow mappings. A YAML alias repeats a
# whole subtree, so nine lines of aliases can stand for a billion values (counted here with repeats).
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 32
MAX_CONFIG_VALUES = 100_000


class _RecipeTooLarge(Exception):
    """Raised while composing a recipe that is nested or aliased beyond the bounds above."""


class _BoundedLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that counts the values a document expands to (an alias counts its whole subtree
    again) and its nesting depth while composing, and stops at `MAX_CONFIG_VALUES` / `MAX_CONFIG_DEPTH`."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._total = 0
        self._sizes: dict[int, int] = {}  # id(node) -> values in its subtree, aliases expanded

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            node = super().compose_node(parent, index)
            self._count(self._sizes.get(id(node), 1))
            return node
        self._depth += 1
        if self._depth > MAX_CONFIG_DEPTH:
            raise _RecipeTooLarge(f"is nested more than {MAX_CONFIG_DEPTH} levels deep")
        total_before = self._total
        node = super().compose_node(parent, index)
        self._depth -= 1
        self._count(1)
        self._sizes[id(node)] = self._total - total_before
        return node

    def _count(self, values: int) -> None:
        self._total += values
        if self._total > MAX_CONFIG_VALUES:
            raise _RecipeTooLarge(f"expands to more than {MAX_CONFIG_VALUES} values (YAML aliases repeat "
                                  "whole subtrees)")


def _read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file '{path}' is {path.stat().st_size} bytes; a recipe may have at most "
                          f"{MAX_CONFIG_BYTES}")
    try:
        tree = yaml.load(path.read_text(encoding="utf-8"), Loader=_BoundedLoader) or {}  # a SafeLoader
        return _fix_floats(tree)
    except _RecipeTooLarge as error:
        raise ConfigError(f"config file '{path}' {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file '{path}' is not valid YAML: {error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file '{path}' is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except RecursionError:
        raise ConfigError(f"config file '{path}' is nested too deeply") from None


def _fix_floats(tree, depth: int = 0):
    """YAML 1.1 reads '5e-4' (no dot) as a string; make such scalars floats. The tree is bounded
    (`_BoundedLoader`); `depth` keeps a tree built some other way from recursing without end."""
    if depth > MAX_CONFIG_DEPTH:  # a YAML alias inside its own anchor makes a tree that contains itself
        raise _RecipeTooLarge(f"is nested more than {MAX_CONFIG_DEPTH} levels deep")
    if isinstance(tree, dict):
        return {k: _fix_floats(v, depth + 1) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_fix_floats(v, depth + 1) for v in tree]
    if isinstance(tree, str) and _looks_like_float(tree) and tree.strip().lower() not in ("nan", "inf", "-inf",
                                                                                          "infinity"):
        return float(tree)
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                values: dict[str, object] | None = None) -> TrainConfig:
    """Defaults <- YAML file at `path` <- `values` ({dotted key: value}, from flags) <- `overrides` ('k=v')."""
    config = TrainConfig()
    if path is not None:
        apply_mapping(config, _read_yaml(path), f"config file '{path}'")
    for key, value in (values or {}).items():
        _set(config, key, value)
    for text in overrides:
        key, value = parse_override(text)
        _set(config, key, value)
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Cross-field checks that a single key's type cannot express."""
    positive = {"train.batch_size": config.train.batch_size, "optim.accumulation_steps": config.optim.accumulation_steps,
                "train.log_every": config.train.log_every, "train.nproc": config.train.nproc,
                "optim.lr_reference_batch": config.optim.lr_reference_batch}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {value}")
    if config.schedule.epochs < 1:  # max_steps caps the epochs' steps; with 0 epochs nothing would train
        raise ConfigError(f"config key 'schedule.epochs' must be >= 1, got {config.schedule.epochs} "
                          "(schedule.max_steps caps the steps of the epochs; it does not replace them)")
    if config.schedule.max_steps is not None and config.schedule.max_steps < 1:
        raise ConfigError(f"config key 'schedule.max_steps' must be >= 1, got {config.schedule.max_steps}")
    _check_ranges(config)
    if not config.data.synthetic and not config.data.path:
        raise ConfigError("no training data: set data.path (--data DIR) or data.synthetic (--synthetic)")
    if config.model.name is None and not config.model.arch and config.model.pretrained is None:
        raise ConfigError("model: give model.name (a registry model), model.arch (SwinConfig fields) "
                          "or model.pretrained")
    if len(config.optim.betas) != 2:
        raise ConfigError(f"config key 'optim.betas' must hold two values, got {config.optim.betas}")
    if not 0 < config.data.crop_pct <= 1:
        raise ConfigError(f"config key 'data.crop_pct' must be in (0, 1], got {config.data.crop_pct}")
    if not 0 <= config.data.max_bad_fraction < 1:
        raise ConfigError(f"config key 'data.max_bad_fraction' must be in [0, 1), got {config.data.max_bad_fraction}")
    low, high = config.augment.scale if len(config.augment.scale) == 2 else (None, None)
    if low is None or not 0 < low <= high <= 1:
        raise ConfigError(f"config key 'augment.scale' must be two values 0 < min <= max <= 1, "
                          f"got {config.augment.scale}")


# Numeric keys and the values that mean something: (lowest, highest, lowest included, highest included).
# A value outside would train nothing, everything, or fail far from the key that caused it.
_RANGES = {
    "optim.lr": (0, math.inf, False, False), "schedule.warmup_lr": (0, math.inf, True, False),
    "schedule.min_lr": (0, math.inf, True, False), "schedule.warmup_epochs": (0, math.inf, True, False),
    "optim.weight_decay": (0, math.inf, True, False), "optim.eps": (0, math.inf, False, False),
    "optim.clip_grad": (0, math.inf, True, False),  # 0 or null: no clipping
    "optim.betas[0]": (0, 1, True, False), "optim.betas[1]": (0, 1, True, False),
    "train.ema_decay": (0, 1, True, False), "train.save_every": (0, math.inf, True, False),
    "train.seed": (0, math.inf, True, False), "data.workers": (0, math.inf, True, False),
    "data.synthetic_train_size": (1, math.inf, True, False), "data.synthetic_val_size": (1, math.inf, True, False),
    "model.num_classes": (1, math.inf, True, False), "model.img_size": (1, math.inf, True, False),
    "model.in_chans": (1, math.inf, True, False), "model.drop_path_rate": (0, 1, True, False),
    "augment.hflip": (0, 1, True, True), "augment.random_erasing": (0, 1, True, True),
    "augment.mix_prob": (0, 1, True, True), "augment.switch_prob": (0, 1, True, True),
    "augment.mixup": (0, math.inf, True, False), "augment.cutmix": (0, math.inf, True, False),
    "augment.label_smoothing": (0, 1, True, False), "augment.crop_padding": (0, math.inf, True, False),
}


def _check_ranges(config: TrainConfig) -> None:
    for key, (low, high, low_ok, high_ok) in _RANGES.items():
        section, name = key.split(".")
        index = None
        if name.endswith("]"):
            name, index = name[:-3], int(name[-2])
        value = getattr(getattr(config, section), name)
        if value is not None and index is not None:
            value = value[index] if index < len(value) else None
        if value is None:
            continue
        above = value > low or (low_ok and value == low)
        below = value < high or (high_ok and value == high)
        if not (above and below):  # NaN fails both
            bounds = f"in {'[' if low_ok else '('}{low}, {high}{']' if high_ok else ')'}"
            if high == math.inf:
                bounds = f"{'>=' if low_ok else '>'} {low}" + (" and finite" if value == math.inf else "")
            raise ConfigError(f"config key '{key}' must be {bounds}, got {value}")
    if config.train.val_every < 1:
        raise ConfigError(f"config key 'train.val_every' must be >= 1, got {config.train.val_every}")
    _validate_pretraining_and_fine_tuning(config)


def _validate_pretraining_and_fine_tuning(config: TrainConfig) -> None:
    """The SimMIM keys, layer decay and the few-label subset."""
    pre, aug = config.pretrain, config.augment
    if pre.method is not None:
        if aug.enabled and (aug.mixup > 0 or aug.cutmix > 0):
            raise ConfigError(f"pretrain.method {pre.method} ignores labels, so mixup/cutmix cannot apply: "
                              "set augment.mixup and augment.cutmix to 0")
        if config.optim.layer_decay is not None:
            raise ConfigError("optim.layer_decay is for fine-tuning; pre-training trains every layer at one rate")
        if pre.mask_patch_size < 1:
            raise ConfigError(f"config key 'pretrain.mask_patch_size' must be >= 1, got {pre.mask_patch_size}")
        if not 0 < pre.mask_ratio < 1:
            raise ConfigError(f"config key 'pretrain.mask_ratio' must be in (0, 1), got {pre.mask_ratio}")
        if pre.preview_images < 0:
            raise ConfigError(f"config key 'pretrain.preview_images' must be >= 0, got {pre.preview_images}")
    if config.optim.layer_decay is not None and not 0 < config.optim.layer_decay <= 1:
        raise ConfigError(f"config key 'optim.layer_decay' must be in (0, 1], got {config.optim.layer_decay}")
    if config.data.labels_per_class is not None and config.data.labels_per_class < 1:
        raise ConfigError(f"config key 'data.labels_per_class' must be >= 1, got {config.data.labels_per_class}")


def save_config(config: TrainConfig, path: str | Path) -> Path:
    text = yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None)
    return atomic_write(path, lambda tmp: tmp.write_text(text))
