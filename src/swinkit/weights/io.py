"""Checkpoint files in and out: safetensors, guarded torch pickles, Hugging Face folders.

This module knows files, not models. `read_checkpoint` turns any supported file or
folder into a flat `{key: Tensor}` state dict plus string metadata; `weights/layouts.py`
then works out which layout the keys are in. Loading never executes code from a file
(pickles go through `torch.load(weights_only=True)` only), and every write is atomic:
a crash or error mid-write leaves the previous file as it was.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..files import atomic_write

__all__ = ["CheckpointError", "read_checkpoint", "write_safetensors"]


class CheckpointError(Exception):
    """A checkpoint file or folder that cannot be read; the message names it and says why."""


# Containers that wrap a state dict, most specific first. EMA weights are a fallback only:
# a training checkpoint holding both {'model', 'model_ema'} means the plain model.
_CONTAINER_KEYS = ("model", "state_dict", "module")
_EMA_KEYS = ("model_ema", "state_dict_ema", "ema")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile
_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                    "pytorch_model.bin", "pytorch_model.bin.index.json")


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a checkpoint into (flat state dict on CPU, metadata).

    `path` is a `.safetensors` file, a torch file (`.pth/.pt/.bin/.ckpt/.tar`), or a
    Hugging Face `save_pretrained` folder (single or sharded weights). Containers
    (`{'model': sd}`, `{'state_dict': sd}`, EMA-only) are unwrapped and a `module.` /
    `_orig_mod.` prefix on every key is stripped. Metadata holds the safetensors header
    metadata, and `hf_config` (config.json as a JSON string) when there is one.
    Raises `CheckpointError` for anything else.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"'{path}' does not exist")
    if path.is_dir():
        return _read_hf_folder(path)
    state_dict, metadata = _read_file(path)
    config = path.parent / "config.json"
    if path.name in _HF_WEIGHT_FILES and config.is_file():  # a file picked out of an HF folder
        metadata["hf_config"] = _read_hf_config(config)
    return state_dict, metadata


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"'{path}' is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(9)
    if path.suffix == ".safetensors" or _looks_like_safetensors(head, size):
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
            return _clean(load_file(str(path), device="cpu"), path), metadata
        except Exception as e:
            raise CheckpointError(f"'{path}' is truncated or corrupt ({_first_line(e)})") from e
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):  # zip or legacy pickle
        raise CheckpointError(f"'{path}' is not a safetensors or PyTorch checkpoint "
                              f"(unrecognised content starting {head[:4]!r})")
    try:
        # argparse.Namespace: timm training checkpoints store their args; it runs no code.
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        message = str(e)
        found = re.search(r"GLOBAL ([\w.]+)", message)
        if found:  # the weights-only unpickler met a class or function and stopped there
            raise CheckpointError(
                f"'{path}' contains objects other than tensors (a reference to {found.group(1)}); swinkit "
                "loads pickles with torch.load(weights_only=True) and never runs code from a file") from e
        operand = re.search(r"Unsupported operand \d+", message)
        if operand:
            raise CheckpointError(f"'{path}' is corrupt or is a pickle the weights-only loader refuses "
                                  f"({operand.group(0)})") from e
        raise CheckpointError(f"'{path}' is truncated or corrupt ({_first_line(e)})") from e
    return _clean(_unwrap(obj, path), path), {}


def _read_hf_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A `save_pretrained` folder: weights (safetensors preferred, maybe sharded) + config.json."""
    present = [name for name in _HF_WEIGHT_FILES if (folder / name).is_file()]
    if not present:
        raise CheckpointError(f"'{folder}' is a folder with no weights (looked for {', '.join(_HF_WEIGHT_FILES)})")
    name = present[0]
    if name.endswith(".index.json"):
        index_path = folder / name
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"'{index_path}' is not a valid shard index ({_first_line(e)})") from e
        state_dict, metadata = {}, {}
        for shard in shards:
            shard_dict, shard_metadata = _read_file(_existing(folder / shard, index_path))
            state_dict.update(shard_dict)
            metadata.update(shard_metadata)
        missing = sorted(set(weight_map) - set(state_dict))
        if missing:
            raise CheckpointError(f"'{index_path}' lists {len(missing)} tensors its shards lack, e.g. '{missing[0]}'")
    else:
        state_dict, metadata = _read_file(folder / name)
    if (folder / "config.json").is_file():
        metadata["hf_config"] = _read_hf_config(folder / "config.json")
    return state_dict, metadata


def _read_hf_config(path: Path) -> str:
    try:
        return json.dumps(json.loads(path.read_text()))
    except ValueError as e:
        raise CheckpointError(f"'{path}' is not valid JSON ({_first_line(e)})") from e


def _existing(path: Path, referenced_by: Path) -> Path:
    if not path.is_file():
        raise CheckpointError(f"'{referenced_by}' names shard '{path.name}', which does not exist")
    return path


def _unwrap(obj: object, path: Path) -> Mapping:
    """Find the state dict inside what a torch file holds."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"'{path}' holds a {type(obj).__name__}, not a dict of tensors")
    if any(isinstance(value, torch.Tensor) for value in obj.values()):
        return obj
    for key in _CONTAINER_KEYS + _EMA_KEYS:
        if isinstance(obj.get(key), Mapping):
            return _unwrap(obj[key], path)
    raise CheckpointError(f"'{path}' holds a dict with no tensors (top-level keys: {sorted(map(str, obj))[:10]})")


def _clean(state_dict: Mapping, path: Path) -> dict[str, torch.Tensor]:
    """Check every entry is a named tensor and strip wrapper prefixes that cover every key."""
    if not state_dict:
        raise CheckpointError(f"'{path}' holds no tensors")
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"'{path}' has entry {key!r} of type {type(value).__name__}, "
                                  "expected a state dict of str -> Tensor")
    state_dict = dict(state_dict)
    stripped = True
    while stripped:  # `_orig_mod.module.` happens when a DDP model is compiled
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in state_dict):
                state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
                stripped = True
    return state_dict


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file opens with an 8-byte little-endian header length, then '{'."""
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size


def _first_line(error: BaseException) -> str:
    """The library's own first sentence, enough to say what broke without its advice."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text.split('. ')[0].rstrip('.')}" if text else type(error).__name__


def write_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Atomically save a state dict as safetensors, with string-to-string header metadata.

    Tensors are moved to CPU and made contiguous; tensors sharing storage (tied weights)
    are copied, since safetensors stores each tensor on its own.
    """
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata must map str to str")
    tensors, seen_storages = {}, set()
    for key, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        tensors[key] = tensor.clone() if storage in seen_storages else tensor
        seen_storages.add(storage)
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=dict(metadata or {})))
