"""Checkpoint key layouts: official <-> timm <-> Hugging Face <-> torchvision <-> native.

swinkit's native names are timm 1.0's parameter names, with no buffers:

    patch_embed.{proj,norm}.*                        norm.*, head.fc.*
    absolute_pos_embed [1, rows * cols, C]           only with `ape` (official name and shape)
    layers.{s}.downsample.{norm,reduction}.*         s >= 1: merging at the START of stage s
    layers.{s}.blocks.{b}.{norm1,norm2,mlp.fc1,mlp.fc2,attn.qkv,attn.proj}.*
    v1: layers.{s}.blocks.{b}.attn.relative_position_bias_table
    v2: layers.{s}.blocks.{b}.attn.{logit_scale,q_bias,v_bias,cpb_mlp.0,cpb_mlp.2}   (qkv has no bias)

Every other layout is a table of rename rules against those names (`_RULES`), plus
the few tensor steps a rename cannot express (Hugging Face's separate q/k/v
projections, torchvision v2's 3C qkv bias, Hugging Face's extra position slot) and
the constant buffers each peer's model expects in its state dict (built from the
config on export, dropped on import). This file is the only place that knows any of
these names.

The absolute position embedding (`ape`): official and native `absolute_pos_embed`
[1, rows * cols, C]; Hugging Face `embeddings.position_embeddings` (`use_absolute_embeddings`),
[1, rows * cols, C] for Swin v1 (transformers >= 5) but [1, 1 + rows * cols, C] for Swinv2
(and for v1 in transformers 4): a ViT class-token slot first, which no Swin forward uses
(`interpolate_pos_encoding` treats slot 0 as the class slot and the rest as the patch grid).
It is dropped on import and written as zeros on export. timm's and torchvision's Swin models
have no absolute position embedding: such weights are refused for those layouts.

    detect_layout(sd)                   -> "official" | "timm" | "hf" | "torchvision"
    version_of(sd, layout)              -> 1 | 2
    infer_config(sd, layout)            -> dict of SwinConfig fields the weights determine
    to_native(sd, layout)               -> native state dict (buffers dropped)
    from_native(sd, layout, config)     -> that layout's state dict (its buffers added)
    hf_config(config, num_labels)       -> config.json dict for transformers' from_pretrained
    split_pretraining(sd)               -> (backbone sd, SimMIM tensors under native names)
    join_pretraining(sd, extra, layout, version) -> a SimMIM pre-training file's state dict
"""
from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping

import torch

from ..errors import SwinkitError
from ..models.attention import relative_coords_table, relative_position_index, window_attention_mask
from ..models.registry import SwinConfig

__all__ = ["LAYOUTS", "LayoutError", "detect_layout", "version_of", "infer_config", "to_native", "from_native",
           "hf_config", "split_pretraining", "join_pretraining", "PRETRAINING_KEYS"]

LAYOUTS = ("native", "official", "timm", "hf", "torchvision")


class LayoutError(SwinkitError, ValueError):
    """A state dict whose keys or tensors no supported layout can represent; the message names them."""


# ----------------------------------------------------------------------------- rename rules
# Each rule pairs a native key pattern with the same weight's key in another layout; the
# first rule that matches wins, in either direction. In a pattern, `{s}` (stage) and `{b}`
# (block) are integers, `{2s+1}`-style fields are linear in them, and `{p}` is the rest of the key.
_OFFICIAL = [  # Microsoft's repo (and timm < 0.9): merging at the END of the previous stage
    ("layers.{s}.downsample.{p}", "layers.{s-1}.downsample.{p}"),
    ("head.fc.{p}", "head.{p}"),
    ("{p}", "{p}"),
]
_TIMM = [("{p}", "{p}")]
_TORCHVISION = [  # features = [patch embed, stage 0, merging, stage 1, merging, ...]
    ("patch_embed.proj.{p}", "features.0.0.{p}"),
    ("patch_embed.norm.{p}", "features.0.2.{p}"),
    ("layers.{s}.downsample.{p}", "features.{2s}.{p}"),
    ("layers.{s}.blocks.{b}.mlp.fc1.{p}", "features.{2s+1}.{b}.mlp.0.{p}"),
    ("layers.{s}.blocks.{b}.mlp.fc2.{p}", "features.{2s+1}.{b}.mlp.3.{p}"),
    ("layers.{s}.blocks.{b}.{p}", "features.{2s+1}.{b}.{p}"),
    ("norm.{p}", "norm.{p}"),
    ("head.fc.{p}", "head.{p}"),
]
_HF_BLOCK = "encoder.layers.{s}.blocks.{b}."
_HF = [  # checkpoint names, after the `swin.` / `swinv2.` prefix is taken off
    ("patch_embed.proj.{p}", "embeddings.patch_embeddings.projection.{p}"),
    ("absolute_pos_embed", "embeddings.position_embeddings"),  # its class slot: `_hf_position_slot`
    ("patch_embed.norm.{p}", "embeddings.norm.{p}"),
    ("layers.{s}.downsample.{p}", "encoder.layers.{s-1}.downsample.{p}"),
    ("layers.{s}.blocks.{b}.norm1.{p}", _HF_BLOCK + "layernorm_before.{p}"),
    ("layers.{s}.blocks.{b}.norm2.{p}", _HF_BLOCK + "layernorm_after.{p}"),
    ("layers.{s}.blocks.{b}.attn.q_bias", _HF_BLOCK + "attention.self.query.bias"),  # v2
    ("layers.{s}.blocks.{b}.attn.v_bias", _HF_BLOCK + "attention.self.value.bias"),  # v2
    ("layers.{s}.blocks.{b}.attn.cpb_mlp.{p}", _HF_BLOCK + "attention.self.continuous_position_bias_mlp.{p}"),
    ("layers.{s}.blocks.{b}.attn.proj.{p}", _HF_BLOCK + "attention.output.dense.{p}"),
    ("layers.{s}.blocks.{b}.attn.{p}", _HF_BLOCK + "attention.self.{p}"),  # qkv (split below), bias table, logit_scale
    ("layers.{s}.blocks.{b}.mlp.fc1.{p}", _HF_BLOCK + "intermediate.dense.{p}"),
    ("layers.{s}.blocks.{b}.mlp.fc2.{p}", _HF_BLOCK + "output.dense.{p}"),
    ("norm.{p}", "layernorm.{p}"),
    ("head.fc.{p}", "classifier.{p}"),
]
_RULES = {"native": _TIMM, "timm": _TIMM, "official": _OFFICIAL, "torchvision": _TORCHVISION, "hf": _HF}

# Import-only aliases: other spellings of the same weights, rewritten before the rules run.
_ALIASES = {
    "timm": [(r"^head\.(weight|bias)$", r"head.fc.\1")],  # timm 0.6-0.8 heads
    "hf": [  # transformers >= 5 module names (model.state_dict()); its save_pretrained writes the old names
        (r"\.attention\.q_proj\.", ".attention.self.query."),
        (r"\.attention\.k_proj\.", ".attention.self.key."),
        (r"\.attention\.v_proj\.", ".attention.self.value."),
        (r"\.attention\.o_proj\.", ".attention.output.dense."),
        (r"\.attention\.relative_position_bias\.", ".attention.self."),
        (r"^(encoder\.layers\.\d+\.blocks\.\d+)\.mlp\.fc1\.", r"\1.intermediate.dense."),
        (r"^(encoder\.layers\.\d+\.blocks\.\d+)\.mlp\.fc2\.", r"\1.output.dense."),
    ],
}

# What a native key may be once renamed; anything else is a weight swinkit cannot hold.
_BLOCK = r"layers\.\d+\.blocks\.\d+\."
_NATIVE_PARAMS = re.compile("|".join([
    r"patch_embed\.(proj|norm)\.(weight|bias)",
    r"layers\.[1-9]\d*\.downsample\.(reduction\.weight|norm\.(weight|bias))",
    _BLOCK + r"(norm1|norm2|mlp\.fc1|mlp\.fc2|attn\.qkv|attn\.proj)\.(weight|bias)",
    _BLOCK + r"attn\.(relative_position_bias_table|logit_scale|q_bias|v_bias)",
    _BLOCK + r"attn\.cpb_mlp\.(0\.weight|0\.bias|2\.weight)",
    r"(norm|head\.fc)\.(weight|bias)",
    r"absolute_pos_embed",
]))
# Constants some layouts store: rebuilt from the config, never learned.
_NATIVE_BUFFERS = re.compile(_BLOCK + r"(attn\.(relative_position_index|relative_coords_table|k_bias)|attn_mask)")

_FIELD = re.compile(r"\{(?:(\d*)([sb])([+-]\d+)?|p)\}")


@functools.lru_cache(maxsize=None)
def _compile(pattern: str) -> tuple[re.Pattern, tuple[tuple[str, int, int], ...]]:
    """A rule pattern as a regex plus, per integer field, (variable, multiplier, offset)."""
    regex, fields, position = "", [], 0
    for match in _FIELD.finditer(pattern):
        regex += re.escape(pattern[position:match.start()])
        if match.group(2) is None:
            regex += r"(.+)"
            fields.append(("p", 1, 0))
        else:
            regex += r"(\d+)"
            fields.append((match.group(2), int(match.group(1) or 1), int(match.group(3) or 0)))
        position = match.end()
    return re.compile(regex + re.escape(pattern[position:]) + "$"), tuple(fields)


def _match(pattern: str, key: str) -> dict | None:
    """The field values that make `pattern` spell `key`, or None."""
    regex, fields = _compile(pattern)
    found = regex.match(key)
    if not found:
        return None
    values: dict = {}
    for (name, multiplier, offset), text in zip(fields, found.groups()):
        if name == "p":
            value = text
        else:
            value, remainder = divmod(int(text) - offset, multiplier)
            if remainder or value < 0:
                return None
        if values.setdefault(name, value) != value:
            return None
    return values


def _format(pattern: str, values: dict) -> str:
    def field(match: re.Match) -> str:
        if match.group(2) is None:
            return values["p"]
        return str(int(match.group(1) or 1) * values[match.group(2)] + int(match.group(3) or 0))
    return _FIELD.sub(field, pattern)


def _rename(key: str, rules: list[tuple[str, str]], to_native: bool) -> str | None:
    for native, foreign in rules:
        source, target = (foreign, native) if to_native else (native, foreign)
        values = _match(source, key)
        if values is not None:
            return _format(target, values)
    return None


# ----------------------------------------------------------------------------- detection
_HF_MODEL_PREFIX = re.compile(r"^(swin|swinv2)\.(?=embeddings\.|encoder\.|layernorm\.)")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise LayoutError(f"unknown checkpoint layout '{layout}'; expected one of {', '.join(LAYOUTS)}")


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Which layout a (container-free) state dict is in: "official", "timm", "hf" or "torchvision".

    swinkit's native keys are timm's, so native weights read as "timm" (the caller tells
    them apart by the metadata swinkit writes). Official checkpoints merge patches at the
    END of a stage (`layers.0.downsample.*`) and name the classifier `head.*`.
    """
    keys = list(state_dict)
    if any(_HF_MODEL_PREFIX.match(k) or k.startswith(("embeddings.", "encoder.")) for k in keys):
        return "hf"
    if any(re.match(r"features\.\d+\.", k) for k in keys):
        return "torchvision"
    if any(k.startswith(("patch_embed.", "layers.")) for k in keys):
        merges_at_stage_end = any(k.startswith("layers.0.downsample.") for k in keys)
        has_later_merging = any(re.match(r"layers\.[1-9]\d*\.downsample\.", k) for k in keys)
        if merges_at_stage_end or ("head.weight" in state_dict and not has_later_merging):
            return "official"
        return "timm"
    sample = ", ".join(repr(k) for k in keys[:4]) or "no keys at all"
    raise LayoutError(f"not a Swin Transformer checkpoint in any known layout "
                      f"({', '.join(LAYOUTS[1:])}): it has {sample}")


def version_of(state_dict: Mapping[str, torch.Tensor], layout: str) -> int:
    """2 for Swin v2 weights (cosine attention: a `logit_scale` per block), else 1."""
    _check_layout(layout)
    return 2 if any(k.endswith("logit_scale") for k in state_dict) else 1


# ----------------------------------------------------------------------------- import
def _renamed_to_native(state_dict: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Native names for every tensor, buffers included (still in the source layout's shapes)."""
    _check_layout(layout)
    if layout in ("timm", "native") and any(k.startswith("layers.0.downsample.") for k in state_dict):
        layout = "official"  # timm < 0.9 saved the official structure
    state_dict = dict(state_dict)
    if layout == "hf":
        state_dict = {_HF_MODEL_PREFIX.sub("", k): v for k, v in state_dict.items()}
    for pattern, replacement in _ALIASES.get(layout, []):
        state_dict = {re.sub(pattern, replacement, k): v for k, v in state_dict.items()}
    if layout == "hf":
        state_dict = _fuse_hf_qkv(state_dict)
        state_dict = _hf_position_slot(state_dict, version_of(state_dict, layout), to_native=True)
    elif layout == "torchvision":
        state_dict = _split_torchvision_qkv_bias(state_dict)
    native, unknown = {}, []
    for key, value in state_dict.items():
        name = _rename(key, _RULES[layout], to_native=True)
        if name is None or not (_NATIVE_PARAMS.fullmatch(name) or _NATIVE_BUFFERS.fullmatch(name)):
            unknown.append(key)
        else:
            native[name] = value
    if unknown:
        more = f" (and {len(unknown) - 4} more)" if len(unknown) > 4 else ""
        raise LayoutError(f"{len(unknown)} key(s) are not weights of a Swin Transformer in the {layout} layout: "
                          f"{', '.join(repr(k) for k in unknown[:4])}{more}")
    return native


def to_native(state_dict: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Rename a state dict in `layout` to swinkit's native names; constant buffers are dropped.

    Tensors are shared with the input, not copied. Raises `LayoutError` (a ValueError)
    naming any key that is not a weight swinkit's model holds.
    """
    native = _renamed_to_native(state_dict, layout)
    return {k: v for k, v in native.items() if not _NATIVE_BUFFERS.fullmatch(k)}


def _fuse_hf_qkv(state_dict: dict) -> dict:
    """HF's separate query/key/value projections -> one `qkv`. v2's key has no bias: there the
    query and value biases stay apart (they become `q_bias` / `v_bias`)."""
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith(".attention.self.query.weight")]:
        prefix = key[: -len("query.weight")]
        params = ("weight", "bias") if prefix + "key.bias" in state_dict else ("weight",)
        for param in params:
            names = [f"{prefix}{part}.{param}" for part in ("query", "key", "value")]
            if all(name in out for name in names):  # else the lone keys are reported as unknown
                out[f"{prefix}qkv.{param}"] = torch.cat([out.pop(name) for name in names])
    return out


_HF_POSITION = "embeddings.position_embeddings"


def _hf_position_slot(state_dict: dict, version: int, to_native: bool) -> dict:
    """Hugging Face's absolute position embedding without (import) or with (export) its unused first slot.

    Swinv2 always has the slot; Swin v1 has it in transformers 4 only, recognised on import by a
    length of a square plus one (transformers 4 builds the table from a square image size)."""
    table = state_dict.get(_HF_POSITION)
    if table is None or table.dim() != 3:
        return state_dict
    out = dict(state_dict)
    if to_native:
        length = table.shape[1]
        transformers4_v1 = (math.isqrt(length - 1) ** 2 == length - 1 and math.isqrt(length) ** 2 != length
                            if length > 1 else False)
        if version == 2 or transformers4_v1:
            out[_HF_POSITION] = table[:, 1:].clone()
    elif version == 2:
        out[_HF_POSITION] = torch.cat([torch.zeros_like(table[:, :1]), table], dim=1)
    return out


def _split_torchvision_qkv_bias(state_dict: dict) -> dict:
    """torchvision v2 keeps a 3C qkv bias; its forward zeroes the key third, so only q and v count."""
    out = {}
    for key, value in state_dict.items():
        attn = key[: -len("qkv.bias")]
        if key.endswith(".attn.qkv.bias") and attn + "logit_scale" in state_dict:
            query, _, value_bias = value.chunk(3)  # the key third never reaches torchvision's attention
            out[attn + "q_bias"], out[attn + "v_bias"] = query.clone(), value_bias.clone()
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------- export
def from_native(state_dict: Mapping[str, torch.Tensor], layout: str, config: SwinConfig) -> dict[str, torch.Tensor]:
    """Native weights of a model built from `config` -> `layout`, loadable with strict=True by that peer.

    Adds the constant buffers the peer keeps in its state dict: official: per-block
    `relative_position_index` [N, N], v2 `relative_coords_table`, `attn_mask` [nW, N, N]
    on shifted blocks; torchvision: `relative_position_index` [N*N], v2 `relative_coords_table`;
    timm and Hugging Face keep none. "hf" gives the checkpoint names transformers'
    `save_pretrained` writes and `from_pretrained` reads (transformers 4 and 5).
    """
    _check_layout(layout)
    params = {k: v for k, v in state_dict.items() if not _NATIVE_BUFFERS.fullmatch(k)}
    version = version_of(params, "native")
    if version != config.version:
        raise LayoutError(f"the weights are Swin v{version} but the config is v{config.version}")
    unknown = [k for k in params if not _NATIVE_PARAMS.fullmatch(k)]
    if unknown:
        raise LayoutError(f"not native swinkit keys: {', '.join(repr(k) for k in unknown[:4])}")
    if layout == "torchvision" or (layout == "hf" and version == 1):
        _check_full_windows(config, layout)
    if "absolute_pos_embed" in params and layout in ("timm", "torchvision"):
        raise LayoutError(f"{layout}'s Swin Transformer has no absolute position embedding (the official `ape`), "
                          "so these weights cannot be written in its layout; use native, official or hf")
    params.update(_BUFFER_BUILDERS.get(layout, lambda c: {})(config))
    out = {}
    for key, value in params.items():
        out[_rename(key, _RULES[layout], to_native=False)] = value
    if layout == "torchvision" and version == 2:
        out = _fuse_torchvision_qkv_bias(out)
    if layout == "hf":
        out = _hf_position_slot(_split_hf_qkv(out), version, to_native=False)
        model = "swin." if version == 1 else "swinv2."
        out = {k if k.startswith("classifier.") else model + k: v for k, v in out.items()}
    return out


def _check_full_windows(config: SwinConfig, layout: str) -> None:
    """torchvision (and HF v1) build every stage with the configured window: a clamped stage has no equivalent."""
    clamped = [i for i, w in enumerate(config.stage_windows()) if w != config.window_size]
    if clamped:
        raise LayoutError(f"{layout} builds every stage with the full window {config.window_size}, but at "
                          f"{config.img_size[0]}x{config.img_size[1]} stage(s) {clamped} use window(s) "
                          f"{[config.stage_windows()[i] for i in clamped]}; these weights cannot be "
                          f"represented in the {layout} layout")


def _split_hf_qkv(state_dict: dict) -> dict:
    out = {}
    for key, value in state_dict.items():
        if ".attention.self.qkv." not in key:
            out[key] = value
            continue
        prefix, param = key.rsplit(".qkv.", 1)
        for name, part in zip(("query", "key", "value"), value.chunk(3)):
            out[f"{prefix}.{name}.{param}"] = part.clone()  # own storage: safetensors refuses shared tensors
    return out


def _fuse_torchvision_qkv_bias(state_dict: dict) -> dict:
    out = {}
    for key, value in state_dict.items():
        if key.endswith(".attn.v_bias"):
            continue
        if key.endswith(".attn.q_bias"):
            attn = key[: -len("q_bias")]
            out[attn + "qkv.bias"] = torch.cat([value, torch.zeros_like(value), state_dict[attn + "v_bias"]])
        else:
            out[key] = value
    return out


def _block_windows(config: SwinConfig):
    """(stage, block, window, pretrained window, (rows, cols) shift of this block, stage resolution)
    for every block, by the model's own shift rule (`SwinConfig.stage_shifts`)."""
    for stage, (depth, window, shift, resolution) in enumerate(zip(
            config.depths, config.stage_windows(), config.stage_shifts(), config.stage_resolutions())):
        for block in range(depth):
            yield stage, block, window, config.pretrained_window_sizes[stage], shift if block % 2 else (0, 0), resolution


def _official_buffers(config: SwinConfig) -> dict[str, torch.Tensor]:
    buffers = {}
    for stage, block, window, pretrained, shift, (height, width) in _block_windows(config):
        name = f"layers.{stage}.blocks.{block}."
        buffers[name + "attn.relative_position_index"] = relative_position_index((window, window))
        if config.version == 2:
            buffers[name + "attn.relative_coords_table"] = relative_coords_table((window, window),
                                                                                 (pretrained, pretrained))
        if shift != (0, 0):
            # The official mask covers the shift regions of the (window-aligned) map, no padding.
            padded_h, padded_w = math.ceil(height / window) * window, math.ceil(width / window) * window
            mask = window_attention_mask(padded_h, padded_w, window, shift)
            buffers[name + "attn_mask"] = mask + 0.0  # [nW, N, N] of 0 / -100 (+ 0.0 turns -0.0 into 0.0)
    return buffers


def _torchvision_buffers(config: SwinConfig) -> dict[str, torch.Tensor]:
    buffers = {}
    for stage, block, window, pretrained, _, _ in _block_windows(config):
        name = f"layers.{stage}.blocks.{block}.attn."
        buffers[name + "relative_position_index"] = relative_position_index((window, window)).flatten()
        if config.version == 2:  # persistent in torchvision, so a pretrained window survives the trip
            buffers[name + "relative_coords_table"] = relative_coords_table((window, window), (pretrained, pretrained))
    return buffers


_BUFFER_BUILDERS = {"official": _official_buffers, "torchvision": _torchvision_buffers}


# ----------------------------------------------------------------------------- config
def infer_config(state_dict: Mapping[str, torch.Tensor], layout: str) -> dict:
    """The `SwinConfig` fields the weights determine.

    Always: version, embed_dim, depths, num_heads, num_classes (0 if headless), in_chans,
    patch_size, mlp_ratio, qkv_bias, patch_norm, ape. When the weights tell (else None):
    window_size (v1: bias table (2W-1)^2 rows; v2: official/torchvision `relative_coords_table`),
    pretrained_window_sizes (v2, from the same tables), img_size (official `attn_mask` shapes,
    else a square absolute position embedding).
    """
    native = _renamed_to_native(state_dict, layout)
    try:
        return _infer_native_config(native)
    except KeyError as missing:
        raise LayoutError(f"the checkpoint is incomplete: it has no {missing} (in swinkit's names)") from None


def _infer_native_config(native: dict) -> dict:
    version = version_of(native, "native")
    embed_dim, in_chans, patch_size, _ = native["patch_embed.proj.weight"].shape
    blocks: dict[int, int] = {}
    for key in native:
        found = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", key)
        if found:
            stage, block = int(found.group(1)), int(found.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
    depths = tuple(blocks.get(stage, 0) for stage in range(max(blocks) + 1)) if blocks else ()
    if not depths or 0 in depths:
        raise LayoutError(f"the checkpoint's stages are incomplete (blocks per stage: {blocks})")
    head_param = "attn.relative_position_bias_table" if version == 1 else "attn.logit_scale"
    first = [f"layers.{stage}.blocks.0." for stage in range(len(depths))]
    num_heads = tuple(native[name + head_param].shape[-1 if version == 1 else 0] for name in first)
    windows = [_window_of(native, name, version) for name in first]
    window_size = max(windows) if None not in windows else None
    pretrained = None
    if version == 2 and window_size is not None:
        found_pretrained = [_pretrained_window_of(native[name + "attn.relative_coords_table"]) for name in first]
        pretrained = tuple(found_pretrained) if None not in found_pretrained else None
    head = native.get("head.fc.weight")
    return {
        "version": version,
        "embed_dim": int(embed_dim),
        "depths": depths,
        "num_heads": tuple(int(h) for h in num_heads),
        "window_size": window_size,
        "pretrained_window_sizes": pretrained,
        "img_size": _img_size_from_masks(native, int(patch_size), depths) or _img_size_from_positions(
            native, int(patch_size)),
        "num_classes": int(head.shape[0]) if head is not None else 0,
        "in_chans": int(in_chans),
        "patch_size": int(patch_size),
        "mlp_ratio": native[first[0] + "mlp.fc1.weight"].shape[0] / embed_dim,
        "qkv_bias": (first[0] + ("attn.qkv.bias" if version == 1 else "attn.q_bias")) in native,
        "patch_norm": "patch_embed.norm.weight" in native,
        "ape": "absolute_pos_embed" in native,
    }


def _window_of(native: dict, block: str, version: int) -> int | None:
    """A block's window: from the v1 bias table ((2W-1)^2 rows) or a v2 coordinate table (2W-1 per side)."""
    if version == 1:
        side = math.isqrt(native[block + "attn.relative_position_bias_table"].shape[0])
    elif block + "attn.relative_coords_table" in native:
        side = native[block + "attn.relative_coords_table"].shape[1]
    else:
        return None
    return (side + 1) // 2


def _pretrained_window_of(table: torch.Tensor) -> int | None:
    """The pretrained window a v2 coordinate table was normalised by (0: its own window).

    The corner entry is log2(8 (W-1)/(P-1) + 1) / 3, which is solved for P and then checked.
    """
    window = (table.shape[1] + 1) // 2
    if window < 2:
        return 0
    corner = 2.0 ** (3.0 * float(table[0, -1, -1, 0])) - 1.0
    if corner <= 0:
        return None
    candidate = round(8.0 * (window - 1) / corner + 1.0)
    for pretrained in (0, candidate):
        expected = relative_coords_table((window, window), (pretrained, pretrained))
        if torch.allclose(table.float(), expected, atol=1e-4):
            return 0 if pretrained in (0, window) else pretrained
    return None


def _img_size_from_masks(native: dict, patch_size: int, depths: tuple) -> tuple[int, int] | None:
    """Official checkpoints store a shifted block's mask [nW, N, N]: the stage is sqrt(nW) windows wide."""
    for stage in range(len(depths)):
        mask = native.get(f"layers.{stage}.blocks.1.attn_mask")
        if mask is not None and mask.dim() == 3:
            windows_per_side, window = math.isqrt(mask.shape[0]), math.isqrt(mask.shape[1])
            if windows_per_side ** 2 == mask.shape[0] and window ** 2 == mask.shape[1]:
                size = windows_per_side * window * patch_size * 2 ** stage
                return (size, size)
    return None


def _img_size_from_positions(native: dict, patch_size: int) -> tuple[int, int] | None:
    """A square absolute position embedding of side S was learned at S * patch_size pixels (official rule)."""
    table = native.get("absolute_pos_embed")
    side = math.isqrt(table.shape[1]) if table is not None and table.dim() == 3 else 0
    return (side * patch_size,) * 2 if side and side * side == table.shape[1] else None


def hf_config(config: SwinConfig, num_labels: int | None = None, *, masked_image_modeling: bool = False) -> dict:
    """A transformers `config.json` dict for `config` (SwinForImageClassification / Swinv2ForImageClassification,
    or with `masked_image_modeling` SwinForMaskedImageModeling / Swinv2ForMaskedImageModeling)."""
    num_labels = config.num_classes if num_labels is None else num_labels
    version = config.version
    height, width = config.img_size
    labels = {i: f"LABEL_{i}" for i in range(num_labels)}
    task = "MaskedImageModeling" if masked_image_modeling else "ImageClassification"
    out = {
        "model_type": "swin" if version == 1 else "swinv2",
        "architectures": [f"Swin{'' if version == 1 else 'v2'}For{task}"],
        "image_size": height if height == width else [height, width],
        "patch_size": config.patch_size,
        "num_channels": config.in_chans,
        "embed_dim": config.embed_dim,
        "depths": list(config.depths),
        "num_heads": list(config.num_heads),
        "window_size": config.window_size,
        "mlp_ratio": config.mlp_ratio,
        "qkv_bias": config.qkv_bias,
        "hidden_act": "gelu",
        "hidden_dropout_prob": config.drop_rate,
        "attention_probs_dropout_prob": config.attn_drop_rate,
        "drop_path_rate": config.drop_path_rate,
        "use_absolute_embeddings": config.ape,
        "layer_norm_eps": 1e-5,
        "initializer_range": 0.02,
        "encoder_stride": config.patch_size * 2 ** (config.num_stages - 1),
        "id2label": {str(i): name for i, name in labels.items()},
        "label2id": {name: i for i, name in labels.items()},
    }
    if version == 2:
        out["pretrained_window_sizes"] = list(config.pretrained_window_sizes)
    return out


# ----------------------------------------------------------------------------- SimMIM pre-training files
# A SimMIM model is a backbone plus a mask token and a decoder (1x1 conv -> pixel shuffle).
#   native / official:  encoder.<backbone key>, encoder.mask_token, decoder.0.{weight,bias}
#   Hugging Face:       {swin,swinv2}.<HF backbone key>, {swin,swinv2}.embeddings.mask_token, decoder.0.*
PRETRAINING_KEYS = ("mask_token", "decoder.0.weight", "decoder.0.bias")  # their native names


def split_pretraining(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A state dict of any layout -> (the backbone's tensors in that layout, the SimMIM tensors under
    `PRETRAINING_KEYS` names). A classifier's state dict comes back whole, with no SimMIM tensors."""
    backbone, extra = {}, {}
    wrapped = "encoder.patch_embed.proj.weight" in state_dict  # official / native SimMIM: the backbone under encoder.
    for key, value in state_dict.items():
        if key.startswith("decoder."):
            extra[key] = value
        elif wrapped and key == "encoder.mask_token" or not wrapped and re.fullmatch(
                r"((swin|swinv2)\.)?embeddings\.mask_token", key):
            extra["mask_token"] = value
        elif wrapped and key.startswith("encoder."):
            backbone[key[len("encoder."):]] = value
        else:
            backbone[key] = value
    unknown = sorted(set(extra) - set(PRETRAINING_KEYS))
    if unknown:
        raise LayoutError(f"{len(unknown)} key(s) are not part of a SimMIM decoder (a 1x1 convolution): "
                          f"{', '.join(repr(k) for k in unknown[:4])}")
    return backbone, extra


def join_pretraining(backbone: Mapping[str, torch.Tensor], extra: Mapping[str, torch.Tensor], layout: str,
                     version: int) -> dict[str, torch.Tensor]:
    """The inverse of `split_pretraining`: a SimMIM file's state dict in `layout` from the backbone's
    tensors (already in `layout`) and the SimMIM tensors. timm and torchvision have no SimMIM model."""
    _check_layout(layout)
    if layout in ("timm", "torchvision"):
        raise LayoutError(f"{layout} has no masked-image-modeling (SimMIM) model; write the pre-training model as "
                          "native, official or hf, or its encoder alone in any layout")
    if layout == "hf":
        prefix = "swin." if version == 1 else "swinv2."
        out = dict(backbone)
        out[prefix + "embeddings.mask_token"] = extra["mask_token"]
    else:
        out = {"encoder." + k: v for k, v in backbone.items()}
        out["encoder.mask_token"] = extra["mask_token"]
    out.update({k: v for k, v in extra.items() if k.startswith("decoder.")})
    return out
