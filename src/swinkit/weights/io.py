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
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from safetensors.torch import load_file, save_file

from ..errors import SwinkitError
from ..files import atomic_write

__all__ = ["CheckpointError", "check_hf_config", "read_checkpoint", "read_safetensors_header",
           "write_safetensors"]


class CheckpointError(SwinkitError):
    """A checkpoint file or folder that cannot be read; the message names it and says why."""


# Containers that wrap a state dict, most specific first. EMA weights are a fallback only:
# a training checkpoint holding both {'model', 'model_ema'} means the plain model.
_CONTAINER_KEYS = ("model", "state_dict", "module")
_EMA_KEYS = ("model_ema", "state_dict_ema", "ema")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile
_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                    "pytorch_model.bin", "pytorch_model.bin.index.json")
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the limit the safetensors format itself sets
MAX_JSON_BYTES = 64 * 1024 * 1024  # config.json, shard indexes
# Bytes per element of the safetensors dtypes (sub-byte float types are left to the library's own check).
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


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
        _, metadata = read_safetensors_header(path)  # what safetensors itself lets through is refused here
        try:
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
            weight_map = _read_json(index_path)["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("'weight_map' must map tensor names to shard file names")
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise CheckpointError(f"'{index_path}' is not a valid shard index ({_first_line(e)})") from e
        state_dict, metadata = {}, {}
        for shard in shards:
            shard_dict, shard_metadata = _read_file(_existing(_shard_path(folder, shard, index_path), index_path))
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


def _read_json(path: Path) -> object:
    """A small JSON file (config.json, a shard index); a huge or deeply nested one raises ValueError."""
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ValueError(f"{path.stat().st_size} bytes, more than the {MAX_JSON_BYTES} such a file may have")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _read_hf_config(path: Path) -> str:
    """config.json as a JSON string, checked to be an object whose fields swinkit reads have usable types."""
    try:
        config = _read_json(path)
    except ValueError as e:
        raise CheckpointError(f"'{path}' is not valid JSON ({_first_line(e)})") from e
    return json.dumps(check_hf_config(config, str(path)))


def check_hf_config(config: object, source: str) -> dict:
    """A Hugging Face config (a dict, or its JSON text) checked to be an object whose fields swinkit reads
    have usable types; `CheckpointError` naming `source` otherwise."""
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except (ValueError, RecursionError) as e:
            raise CheckpointError(f"'{source}' is not valid JSON ({_first_line(e)})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"'{source}' holds a JSON {type(config).__name__}, expected an object of settings")
    for key, valid in _HF_CONFIG_TYPES.items():
        if config.get(key) is not None and not valid(config[key]):
            raise CheckpointError(f"'{source}' has {key} {config[key]!r}, expected {_HF_CONFIG_EXPECTED[key]}")
    return config


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# The config.json fields swinkit reads (`api._config_from_checkpoint`), and what each must be.
_HF_CONFIG_TYPES = {
    "window_size": _positive_int,
    "image_size": lambda v: _positive_int(v) or (isinstance(v, list) and len(v) == 2 and all(map(_positive_int, v))),
}
_HF_CONFIG_EXPECTED = {"window_size": "a positive integer", "image_size": "a positive integer or [height, width]"}


def _shard_path(folder: Path, shard: str, index_path: Path) -> Path:
    """`folder / shard`, refused when the name leads outside `folder` ('..', an absolute path, a link out).

    A Hugging Face hub cache folder (`snapshots/<revision>/`) links its files to `../../blobs/`; those are read.
    """
    parts = PurePosixPath(shard).parts
    if not shard or "\0" in shard or PurePosixPath(shard).is_absolute() or PureWindowsPath(shard).anchor \
            or ".." in parts or ".." in PureWindowsPath(shard).parts:
        raise CheckpointError(f"'{index_path}' names shard '{shard}', which is outside the folder '{folder}'; "
                              "swinkit reads only files inside the folder it is given")
    path = folder / shard
    inside = folder.resolve()
    target = path.resolve()
    hub_blobs = inside.parent.parent / "blobs" if inside.parent.name == "snapshots" else None
    if not (target.is_relative_to(inside) or (hub_blobs is not None and target.parent == hub_blobs)):
        raise CheckpointError(f"'{index_path}' names shard '{shard}', a link to '{target}' outside the folder "
                              f"'{folder}'; swinkit reads only files inside the folder it is given")
    return path


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


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """(tensor entries, string metadata) of a safetensors file, read and checked without loading a tensor.

    The header (an 8-byte little-endian length, then JSON) is parsed here rather than trusted to the
    safetensors library, which keeps the later of two entries with the same name: a name given twice, a
    header longer than the file or than `MAX_SAFETENSORS_HEADER`, offsets outside the data or
    overlapping, or a byte count that does not fit the dtype and shape raise `CheckpointError`.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
        if length is None or length > size - 8:
            raise CheckpointError(f"'{path}' is truncated or corrupt (its safetensors header is longer than the file)")
        if length > MAX_SAFETENSORS_HEADER:
            raise CheckpointError(f"'{path}' has a safetensors header of {length} bytes, more than the "
                                  f"{MAX_SAFETENSORS_HEADER} swinkit reads")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise CheckpointError(f"'{path}' names '{e.key}' twice in its safetensors header (safetensors would "
                              "silently keep the second); the file is corrupt or was tampered with") from None
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"'{path}' is truncated or corrupt (its safetensors header is not valid JSON: "
                              f"{_first_line(e)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"'{path}' is corrupt (its safetensors header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"'{path}' is corrupt (its safetensors metadata is not a map of strings)")
    data_size = size - 8 - length
    spans = []
    for name, entry in header.items():
        problem = _entry_problem(entry, data_size)
        if problem:
            raise CheckpointError(f"'{path}' is truncated or corrupt: tensor '{name}' {problem}")
        spans.append((*entry["data_offsets"], name))
    spans.sort()
    for (_, end, name), (begin, _, other) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"'{path}' is corrupt: tensors '{name}' and '{other}' share bytes")
    return header, metadata


def _entry_problem(entry, data_size: int) -> str | None:
    """Why a safetensors header entry cannot describe a tensor in `data_size` bytes of data, if it cannot."""
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        return "has no dtype"
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        return f"has an invalid shape {shape!r}"
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size):
        return f"has data offsets {offsets!r} outside the file's {data_size} data bytes"
    itemsize = _DTYPE_BYTES.get(entry["dtype"])
    if itemsize is not None and math.prod(shape) * itemsize != offsets[1] - offsets[0]:
        return (f"of dtype {entry['dtype']} and shape {shape} needs {math.prod(shape) * itemsize} bytes, "
                f"but its data offsets span {offsets[1] - offsets[0]}")
    return None


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """`json.loads` object hook: a JSON object naming a key twice is refused, not silently merged."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


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
