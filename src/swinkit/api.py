"""Public entry points: build a model, load and save weights in any layout, convert files.

Loading goes: file -> `weights.io.read_checkpoint` (safe unpickling) -> layout
detection -> `weights.layouts.to_native` -> `weights.resize.adapt_state_dict`
(window / channels / head) -> a strict check that lists every problem -> the model.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from .files import atomic_write, torch_save_atomic
from .metadata import FORMAT_ENTRY, META_CONFIG, META_NAME, config_from_metadata, model_entries
from .models.registry import MODELS, SwinConfig, get_config, name_for_config
from .models.simmim import SimMIM
from .models.swin import SwinTransformer
from .weights import layouts
from .weights.io import CheckpointError, check_hf_config, read_checkpoint, write_safetensors
from .weights.resize import adapt_state_dict

log = logging.getLogger("swinkit")


@dataclass
class LoadReport:
    """What `load_weights` did: the layout it found and every adaptation it made."""

    source: str
    layout: str
    notes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


@dataclass
class Checkpoint:
    """A checkpoint read into the native layout, with what is known about its model."""

    source: str
    layout: str
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str]
    config: SwinConfig | None
    name: str | None
    pretraining: dict[str, torch.Tensor] = field(default_factory=dict)  # SimMIM mask token + decoder, if any


def _describe(source) -> str:
    return str(source) if isinstance(source, (str, Path)) else "<state dict>"


def read_native(source: str | Path | Mapping[str, torch.Tensor] | Checkpoint) -> Checkpoint:
    """Read a file (any layout) or a state dict into the native layout. Nothing is built.
    A SimMIM pre-training file gives its backbone, with the mask token and decoder in `pretraining`."""
    if isinstance(source, Checkpoint):
        return source
    label = _describe(source)
    if isinstance(source, Mapping):
        state_dict, metadata = dict(source), {}
    else:
        state_dict, metadata = read_checkpoint(source)
    try:
        state_dict, pretraining = layouts.split_pretraining(state_dict)
    except ValueError as error:
        raise CheckpointError(f"'{label}': {error}") from None
    if META_CONFIG in metadata:
        layout = "native"
    else:
        try:
            layout = layouts.detect_layout(state_dict)
        except ValueError as error:
            raise CheckpointError(f"'{label}' is not a Swin Transformer checkpoint: {error}") from None
    try:
        native = state_dict if layout == "native" else layouts.to_native(state_dict, layout)
    except ValueError as error:
        raise CheckpointError(f"'{label}' ({layout} layout) cannot be converted: {error}") from None
    config, name = _config_from_checkpoint(state_dict, metadata, layout, label)
    return Checkpoint(label, layout, native, metadata, config, name, pretraining)


def _config_from_checkpoint(state_dict, metadata, layout, label) -> tuple[SwinConfig | None, str | None]:
    """The model a checkpoint holds: from swinkit metadata, else inferred from its tensors
    (and buffers, which carry the window for v2) and a Hugging Face config.json."""
    config = config_from_metadata(metadata, source=label)
    if config is not None:
        _check_config_fits(config, state_dict, label)
        return config, metadata.get(META_NAME) or name_for_config(config)
    try:
        inferred = layouts.infer_config(state_dict, layout)
    except (ValueError, KeyError) as error:
        log.debug("could not infer a config from %s: %s", label, error)
        return None, None
    if "hf_config" in metadata:
        hf = check_hf_config(metadata["hf_config"], label)  # read_checkpoint checked config.json already
        if inferred.get("window_size") is None:
            inferred["window_size"] = hf.get("window_size")
        if hf.get("image_size"):
            inferred["img_size"] = hf["image_size"]
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in inferred.items()
              if k in SwinConfig.__dataclass_fields__ and v is not None}
    if isinstance(fields.get("img_size"), int):
        fields["img_size"] = (fields["img_size"], fields["img_size"])
    name = _unique_registry_match(fields)
    try:
        if name is not None:
            registered = get_config(name)
            config = registered.replace(num_classes=fields.get("num_classes", registered.num_classes),
                                        in_chans=fields.get("in_chans", registered.in_chans))
        elif fields.get("window_size") is None:
            return None, None
        else:
            config = SwinConfig(**fields)
        config.check_limits()
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"'{label}' describes a model swinkit cannot build: {error}") from None
    return config, name


# The most head parameters a file's metadata may ask for without holding the head's weights (a
# converted headless checkpoint keeps its variant's class count): ImageNet-22k's large head is 34M.
_MAX_MISSING_HEAD_PARAMS = 100_000_000


def _check_config_fits(config: SwinConfig, state_dict: Mapping[str, torch.Tensor], label: str) -> None:
    """Refuse `swinkit_config` metadata that does not describe the file's own tensors, before any model is
    built: its parameter shapes come from a model built on the meta device (no memory), so a small file
    claiming a huge model costs nothing. Only what `load_weights` tolerates may be missing (the head,
    the pre-training mask token), and a missing head must be of a sane size."""
    try:
        with torch.device("meta"):
            expected = {k: v.shape for k, v in SwinTransformer(config).state_dict().items()}
    except (ValueError, RuntimeError, TypeError) as error:
        raise CheckpointError(f"'{label}' has {META_CONFIG} metadata swinkit cannot build: {error}") from None
    problems = [f"'{k}' is {list(state_dict[k].shape)} but the metadata's model has {list(shape)}"
                for k, shape in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(shape)]
    problems += [f"it has no '{k}' {list(shape)}" for k, shape in expected.items()
                 if k not in state_dict and not k.startswith("head.fc.") and k != "mask_token"]
    if "head.fc.weight" not in state_dict and config.num_classes * config.num_features > _MAX_MISSING_HEAD_PARAMS:
        problems.append(f"it has no classifier for the metadata's {config.num_classes} classes")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"'{label}' has {META_CONFIG} metadata that does not match its tensors: "
                              f"{'; '.join(problems[:3])}{more}")


def _unique_registry_match(fields: dict) -> str | None:
    """The one registered variant agreeing with every architecture field known from a file, if unique
    (a v2 file without buffers does not say its window, so several may match)."""
    keys = [k for k in ("version", "embed_dim", "depths", "num_heads", "patch_size", "window_size", "img_size", "ape")
            if k in fields]
    matches = [name for name, config in MODELS.items() if all(getattr(config, k) == fields[k] for k in keys)]
    return matches[0] if len(matches) == 1 else None


def create_model(name: str | None = None, *, pretrained: str | Path | Checkpoint | None = None,
                 num_classes: int | None = None,
                 img_size: int | tuple[int, int] | None = None, window_size: int | None = None,
                 in_chans: int | None = None, drop_path_rate: float | None = None,
                 **overrides) -> SwinTransformer:
    """Build a registered variant (or the one a checkpoint describes) and optionally load weights.

    With `pretrained` and no `num_classes`, the head keeps the checkpoint's class count.
    Different class count, image size, window or channels from the checkpoint's are
    adapted (see `weights.resize`); a re-initialised head is logged, never silent.
    """
    checkpoint = read_native(pretrained) if pretrained is not None else None
    if name is not None:
        config = get_config(name)
        if checkpoint is not None:
            if checkpoint.config is not None and checkpoint.name == name:
                config = checkpoint.config  # same variant: keep its trained size, classes and channels
            config = _fit_to_weights(checkpoint.state_dict, config)
    elif checkpoint is not None:
        if checkpoint.config is None:
            raise CheckpointError(f"'{checkpoint.source}' does not say which Swin variant it holds "
                                  "(no swinkit metadata and the window size cannot be inferred); pass a model name")
        config, name = checkpoint.config, checkpoint.name
    else:
        raise ValueError("create_model needs a model name or a pretrained file")
    changes = {k: v for k, v in dict(num_classes=num_classes, img_size=img_size, window_size=window_size,
                                     in_chans=in_chans, drop_path_rate=drop_path_rate, **overrides).items()
               if v is not None}
    try:
        config = config.replace(**changes)
    except TypeError as error:
        raise TypeError(f"create_model: {error}") from None
    model = SwinTransformer(config, name=name)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model


# Tensors a checkpoint may lack (besides the head): pre-training state, and a position embedding added for fine-tuning.
_MAY_BE_MISSING = ("mask_token", "absolute_pos_embed")


def load_weights(model: SwinTransformer, source: str | Path | Mapping[str, torch.Tensor] | Checkpoint, *,
                 strict: bool = True) -> LoadReport:
    """Load a checkpoint of any layout into `model`, adapting window/channels/head as fine-tuning needs.

    With `strict`, any other missing, unexpected or mis-shaped key raises one
    `CheckpointError` that lists them all with shapes; without it they are logged.
    """
    checkpoint = source if isinstance(source, Checkpoint) else read_native(source)
    state_dict = checkpoint.state_dict
    if model.num_classes == 0:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    grid = checkpoint.config.patch_grid() if checkpoint.config is not None else None
    state_dict, notes = adapt_state_dict(state_dict, model, grid)
    target = model.state_dict()
    missing = sorted(k for k in set(target) - set(state_dict)
                     if not k.startswith("head.fc.") and k not in _MAY_BE_MISSING)
    unexpected = sorted(set(state_dict) - set(target))
    mismatched = sorted(k for k in set(state_dict) & set(target) if state_dict[k].shape != target[k].shape)
    label = model.name or "the model"
    if strict and (missing or unexpected or mismatched):
        lines = [f"'{checkpoint.source}' ({checkpoint.layout} layout) does not fit {label}:"]
        lines += [f"  shape mismatch {k}: checkpoint {list(state_dict[k].shape)}, model {list(target[k].shape)}"
                  for k in mismatched]
        lines += [f"  missing {k} {list(target[k].shape)}" for k in missing]
        lines += [f"  unexpected {k} {list(state_dict[k].shape)}" for k in unexpected]
        raise CheckpointError("\n".join(lines))
    loadable = {k: v for k, v in state_dict.items() if k in target and k not in mismatched}
    model.load_state_dict(loadable, strict=False)
    if checkpoint.pretraining:
        notes.append(f"SimMIM pre-training tensors not used by the model ({', '.join(sorted(checkpoint.pretraining))}):"
                     " dropped")
    if model.absolute_pos_embed is not None and "absolute_pos_embed" not in loadable:
        notes.append("the checkpoint has no absolute position embedding: the model's keeps its fresh initialisation")
        log.warning("%s: no absolute position embedding (ape) in the checkpoint; the model's is freshly initialised",
                    checkpoint.source)
    if model.num_classes > 0 and "head.fc.weight" not in loadable:
        notes.append("the checkpoint has no usable classifier: the head keeps its fresh initialisation")
        log.warning("%s: no classifier weights for %s classes; the head is freshly initialised",
                    checkpoint.source, model.num_classes)
    for note in notes:
        log.info("%s: %s", checkpoint.source, note)
    if not strict and (missing or unexpected or mismatched):
        log.warning("%s: missing %s, unexpected %s, mismatched %s", checkpoint.source, missing, unexpected,
                    mismatched)
    return LoadReport(checkpoint.source, checkpoint.layout, notes, missing + mismatched, unexpected)


def model_metadata(model: SwinTransformer, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Metadata that lets a file alone recreate its model (config, name) plus `extra` strings."""
    return {**model_entries(model.config, model.name), **(extra or {})}


def save_weights(model: SwinTransformer | SimMIM, path: str | Path, *, layout: str = "native",
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Write the model's weights atomically. Native: safetensors with config metadata;
    other layouts: the peer's own file form (see `write_layout`). A `SimMIM` model is written as a
    pre-training file (native, official or hf); `model.encoder` alone as a backbone."""
    encoder = model.encoder if isinstance(model, SimMIM) else model
    native = {k: v.detach() for k, v in encoder.state_dict().items()}  # buffers are non-persistent
    pretraining = {}
    if isinstance(model, SimMIM):
        pretraining = {"mask_token": native.pop("mask_token"),
                       **{f"decoder.{k}": v.detach() for k, v in model.decoder.state_dict().items()}}
    else:
        native.pop("mask_token", None)  # a classifier's file; the token is pre-training state
    return write_layout(native, path, layout, encoder.config, model_metadata(encoder, metadata), pretraining)


def write_layout(native: Mapping[str, torch.Tensor], path: str | Path, layout: str, config: SwinConfig,
                 metadata: Mapping[str, str] | None = None,
                 pretraining: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write a native state dict as `layout`: native/timm -> .safetensors (or .pth by suffix),
    official -> `{'model': sd}` .pth, torchvision -> .pth, hf -> a save_pretrained folder.
    With `pretraining` (SimMIM mask token and decoder), a pre-training file (`layouts.join_pretraining`)."""
    if layout not in layouts.LAYOUTS:
        raise ValueError(f"unknown layout '{layout}'; choose one of {', '.join(layouts.LAYOUTS)}")
    path = Path(path)
    state_dict = dict(native) if layout == "native" else layouts.from_native(dict(native), layout, config)
    if pretraining:
        state_dict = layouts.join_pretraining(state_dict, pretraining, layout, config.version)
    state_dict = {k: v.contiguous() for k, v in state_dict.items()}
    if layout == "hf":
        path.mkdir(parents=True, exist_ok=True)
        hf_config = layouts.hf_config(config, config.num_classes, masked_image_modeling=bool(pretraining))
        atomic_write(path / "config.json", lambda tmp: tmp.write_text(json.dumps(hf_config, indent=2)))
        write_safetensors(state_dict, path / "model.safetensors", FORMAT_ENTRY)
        return path
    if layout == "official":
        return torch_save_atomic({"model": state_dict}, path)
    if path.suffix == ".safetensors":
        return write_safetensors(state_dict, path, dict(metadata or {}) if layout == "native" else FORMAT_ENTRY)
    return torch_save_atomic(state_dict, path)


def convert_checkpoint(src: str | Path, dst: str | Path, *, to: str, model: str | None = None) -> Path:
    """Convert a checkpoint file between layouts without building a model (tensors are copied exactly)."""
    checkpoint = read_native(src)
    config = checkpoint.config
    name = checkpoint.name
    if model is not None:
        config = _fit_to_weights(checkpoint.state_dict, get_config(model))
        name = model
    if config is None:
        raise CheckpointError(f"'{src}' does not say which Swin variant it holds; pass model=NAME (--model)")
    return write_layout(checkpoint.state_dict, dst, to, config, model_entries(config, name), checkpoint.pretraining)


def _fit_to_weights(native: Mapping[str, torch.Tensor], config: SwinConfig) -> SwinConfig:
    """`config` with what the weights themselves decide: the class count (when they hold a head) and
    whether there is an absolute position embedding."""
    head = native.get("head.fc.weight")
    return config.replace(num_classes=head.shape[0] if head is not None else config.num_classes,
                          ape="absolute_pos_embed" in native)


def create_simmim(name: str | None = None, *, pretrained: str | Path | None = None, **overrides) -> SimMIM:
    """A SimMIM pre-training model (`models.simmim.SimMIM`): the backbone `create_model` builds, with no
    head, a mask token and a decoder. `pretrained` takes any file `create_model` takes; a SimMIM file
    (native, official, or a Hugging Face masked-image-modeling folder) also restores its mask token
    and decoder, any other keeps them freshly initialised (logged)."""
    checkpoint = read_native(pretrained) if pretrained is not None else None
    overrides.pop("num_classes", None)
    backbone = dataclasses.replace(checkpoint, pretraining={}) if checkpoint is not None else None
    encoder = create_model(name, pretrained=backbone, num_classes=0, **overrides)
    model = SimMIM(encoder)
    if checkpoint is not None:
        load_pretraining(model, checkpoint)
    return model


def load_pretraining(model: SimMIM, source: str | Path | Checkpoint) -> None:
    """The SimMIM mask token and decoder of `source` into `model` (its backbone is loaded apart);
    a file without them leaves both as they are (logged)."""
    checkpoint = read_native(source)
    extra = checkpoint.pretraining
    if not extra:
        log.info("%s holds no SimMIM mask token or decoder: both are freshly initialised", checkpoint.source)
        return
    target = {"mask_token": model.encoder.mask_token,
              **{f"decoder.{k}": v for k, v in model.decoder.state_dict().items()}}
    problems = [f"  {k}: checkpoint {list(extra[k].shape)}, model {list(v.shape)}" for k, v in target.items()
                if k in extra and extra[k].shape != v.shape]
    problems += [f"  missing {k} {list(v.shape)}" for k, v in target.items() if k not in extra]
    if problems:
        raise CheckpointError("\n".join([f"'{checkpoint.source}' ({checkpoint.layout} layout) has SimMIM tensors "
                                          f"that do not fit {model.encoder.name or 'the model'}:", *problems]))
    with torch.no_grad():
        model.encoder.mask_token.copy_(extra["mask_token"])
        model.decoder.load_state_dict({k[len("decoder."):]: v for k, v in extra.items() if k.startswith("decoder.")})
