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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..data.errors import MAX_BAD_FRACTION
from ..data.transforms import OFFICIAL_CROP_PCT, OFFICIAL_INTERPOLATION
from ..files import atomic_write
from ..models.registry import SwinConfig
from ..precision import PRECISIONS
STRATEGIES = ("ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
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
    resume: bool = False


@dataclass
class OutputSection:
    dir: str = "runs/train"
    tensorboard: bool = True
    progress: bool = True  # tqdm bar (off anyway when stderr is not a TTY or CI is set)
    curves: bool = True  # curves.png


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    output: OutputSection = field(default_factory=OutputSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {"train.precision": PRECISIONS, "train.strategy": STRATEGIES, "train.device": DEVICES}
_SWIN_FIELDS = {f.name: f for f in dataclasses.fields(SwinConfig)}


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
        out[name] = list(value) if isinstance(value, tuple) else value
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
    if key in _CHOICES and checked not in _CHOICES[key]:
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


def _read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file '{path}' is not valid YAML: {error}") from None
    return _fix_floats(tree)


def _fix_floats(tree):
    """YAML 1.1 reads '5e-4' (no dot) as a string; make such scalars floats."""
    if isinstance(tree, dict):
        return {k: _fix_floats(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_fix_floats(v) for v in tree]
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
    if config.schedule.epochs < 1 and config.schedule.max_steps is None:
        raise ConfigError("config key 'schedule.epochs' must be >= 1")
    if config.schedule.max_steps is not None and config.schedule.max_steps < 1:
        raise ConfigError(f"config key 'schedule.max_steps' must be >= 1, got {config.schedule.max_steps}")
    if config.train.save_every < 0:
        raise ConfigError(f"config key 'train.save_every' must be >= 0, got {config.train.save_every}")
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


def save_config(config: TrainConfig, path: str | Path) -> Path:
    text = yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None)
    return atomic_write(path, lambda tmp: tmp.write_text(text))
