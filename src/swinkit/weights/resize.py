"""Adapt a native-layout state dict to a model of a different window, input channels or head.

These are the fine-tuning loads of the official repository, done in one place:
- v1 relative-position bias tables: bicubic interpolation of each head's
  (2W-1)x(2W-1) grid to the new window (v2 needs nothing: its coordinate tables
  are buffers rebuilt from the window, and its CPB MLP takes any window);
- the absolute position embedding (`ape`): bicubic interpolation of the patch grid
  to the new image size, the same function the model runs for an input of another size;
- patch embedding with a different number of input channels (sum to grey, or tile);
- an ImageNet-22k head (21,841 classes) loaded into a 1k model selects the 1k rows
  with the official map; any other class-count mismatch re-initialises the head.
"""
from __future__ import annotations

import logging
import math
from importlib import resources

import torch
import torch.nn.functional as F

log = logging.getLogger("swinkit")

IMAGENET22K_CLASSES = 21841


def resize_relative_position_bias_table(table: torch.Tensor, window: int) -> torch.Tensor:
    """`[(2W-1)^2, heads]` -> `[(2W'-1)^2, heads]` by bicubic interpolation per head (official rule)."""
    old_side = round(table.shape[0] ** 0.5)
    new_side = 2 * window - 1
    if old_side == new_side:
        return table
    heads = table.shape[1]
    grid = table.float().permute(1, 0).reshape(1, heads, old_side, old_side)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return grid.reshape(heads, new_side * new_side).permute(1, 0).contiguous().to(table.dtype)


def resize_absolute_position_embedding(table: torch.Tensor, grid: tuple, new_grid: tuple) -> torch.Tensor:
    """THE resize of the absolute position embedding: `[1, rows * cols, C]` learned on the `grid`
    (rows, cols) of patches -> `[1, new_rows * new_cols, C]` for `new_grid`, row-major both.

    Bicubic, align_corners=False, no antialiasing (the official fine-tune loader's and Hugging Face's
    `interpolate_pos_encoding`), computed in float32 and returned in the table's dtype. The model runs
    it for inputs of another size and the loader for a checkpoint of another image size. Sizes may be
    symbolic (an ONNX export with dynamic height/width): then it always interpolates, which is exact
    at the same size."""
    rows, cols = grid
    new_rows, new_cols = new_grid
    if all(isinstance(size, int) for size in (rows, cols, new_rows, new_cols)) and (rows, cols) == (new_rows, new_cols):
        return table
    channels = table.shape[-1]
    image = table.float().reshape(1, rows, cols, channels).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=(new_rows, new_cols), mode="bicubic", align_corners=False)
    return image.permute(0, 2, 3, 1).reshape(1, -1, channels).to(table.dtype)


def square_grid(length: int) -> tuple[int, int] | None:
    """The (side, side) grid of `length` patches, or None if it is not a square (the official loader's
    assumption for a position table whose image size is not known)."""
    side = math.isqrt(length)
    return (side, side) if side * side == length else None


def adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Patch-embedding kernel `[C, C_in, p, p]` -> `[C, in_chans, p, p]`.

    RGB -> grey sums the colour kernels (a grey image replicated to RGB gives the
    same response); other counts tile the kernels and rescale to keep the output scale.
    """
    old = weight.shape[1]
    if old == in_chans:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_chans // old)
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (old / in_chans)


def imagenet22k_to_1k_rows() -> torch.Tensor:
    """Row indices of the 1k classes inside a 22k head (official `map22kto1k.txt`)."""
    text = resources.files("swinkit.data").joinpath("imagenet22k_to_1k.txt").read_text()
    return torch.tensor([int(line) for line in text.split()], dtype=torch.long)


def adapt_state_dict(state_dict: dict[str, torch.Tensor], model: torch.nn.Module,
                     grid: tuple[int, int] | None = None) -> tuple[dict, list[str]]:
    """Resize what can be resized so `state_dict` fits `model`. Returns (new dict, notes).

    `grid`: the patch grid the checkpoint's absolute position embedding was learned on (its config's
    `patch_grid()`); unknown, a square grid is assumed, as the official loader does.
    Keys that still do not fit are left as they are for the caller to report.
    """
    target = model.state_dict()
    out = dict(state_dict)
    notes: list[str] = []
    for key, value in state_dict.items():
        want = target.get(key)
        if key == "absolute_pos_embed" and want is not None and value.dim() == 3 and value.shape[-1] == want.shape[-1]:
            # by grid, not shape: a 8x12 table has the shape of a 12x8 one
            source = grid if grid is not None and grid[0] * grid[1] == value.shape[1] else square_grid(value.shape[1])
            new_grid = tuple(model.config.patch_grid())
            if source is not None and tuple(source) != new_grid:
                out[key] = resize_absolute_position_embedding(value, source, new_grid)
                notes.append(f"resized {key} from a {source[0]}x{source[1]} to a {new_grid[0]}x{new_grid[1]} "
                             "patch grid (bicubic)")
            continue
        if want is None or want.shape == value.shape:
            continue
        if key.endswith("relative_position_bias_table") and value.shape[1] == want.shape[1]:
            window = (round(want.shape[0] ** 0.5) + 1) // 2
            out[key] = resize_relative_position_bias_table(value, window)
            notes.append(f"resized {key} {list(value.shape)} -> {list(want.shape)} (bicubic)")
        elif key == "patch_embed.proj.weight" and value.shape[0] == want.shape[0] \
                and value.shape[2:] == want.shape[2:]:
            out[key] = adapt_input_channels(value, want.shape[1])
            notes.append(f"adapted {key} from {value.shape[1]} to {want.shape[1]} input channels")
        elif key.startswith("head.fc."):
            if value.shape[0] == IMAGENET22K_CLASSES and want.shape[0] == 1000 and value.shape[1:] == want.shape[1:]:
                out[key] = value[imagenet22k_to_1k_rows()]
                notes.append(f"selected the ImageNet-1k rows of the 22k head for {key}")
            else:
                del out[key]
                log.warning("classifier %s has shape %s in the checkpoint but the model has %s: "
                            "the head is re-initialised", key, list(value.shape), list(want.shape))
                notes.append(f"re-initialised {key}: checkpoint {list(value.shape)}, model {list(want.shape)}")
    return out, notes
