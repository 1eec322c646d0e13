"""Datasets: image folders (robust decoding, counted failures) and synthetic data.

`ImageFolderDataset` reads the torchvision layout `root/<class>/<image>` and hands the
transform a PIL image in mode RGB (or L when `in_chans == 1`), whatever the file held.

Unreadable files and DataLoader workers
---------------------------------------
A file that fails to decode is flagged, named once in a logging warning, and replaced by
the next readable sample, so one bad JPEG never kills an epoch. The flags live in a
shared-memory tensor (one byte per sample) created with the dataset, so a flag set in a
DataLoader worker is visible in the main process under every start method (fork, spawn,
forkserver) and with persistent workers. The trainer reads

    dataset.num_failed        distinct files that failed so far
    dataset.failed_paths()    their paths
    dataset.check_failures()  raises DataError when more than 1% of the samples failed (errors.py)

e.g. once per epoch after iterating the loader. Under DDP every rank holds its own
flags; all-reduce `num_failed` if one global number is wanted.
"""
from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from .errors import MAX_BAD_FRACTION, DataError, check_unreadable

logger = logging.getLogger(__name__)

# What a corrupt, truncated or non-image file raises inside PIL.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
SPLIT_NAMES = ("train", "val", "test")


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Composite an image with transparency onto white -> RGB."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_model_mode(image: Image.Image, in_chans: int = 3) -> Image.Image:
    """Any PIL mode -> 8-bit 'RGB' (or 'L' for in_chans == 1).

    16/32-bit integer modes (I;16*, I) are taken as 16-bit data and scaled by 255/65535;
    float mode F is taken as [0, 1] when its maximum is <= 1, else as [0, 255]. Transparency
    (alpha channels, or a palette / tRNS transparent colour) is composited onto white.
    """
    target = "L" if in_chans == 1 else "RGB"
    mode = image.mode
    if mode == "I" or mode.startswith("I;16") or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if mode == "F":
            values = values * 255.0 if values.size and np.nanmax(values) <= 1.0 else values
        else:
            values = values / 257.0  # 65535 -> 255
        image = Image.fromarray(np.nan_to_num(values).round().clip(0, 255).astype(np.uint8))
    elif mode in _ALPHA_MODES or "transparency" in image.info:
        image = _flatten_alpha(image)
    return image if image.mode == target else image.convert(target)


def load_image(path: str | Path, in_chans: int = 3) -> Image.Image:
    """Decode an image file fully, apply its EXIF orientation, convert with `to_model_mode`.

    Raises whatever PIL raises for an unreadable file (OSError, SyntaxError, ...).
    """
    with Image.open(path) as image:
        image.load()  # decode now, so a truncated file fails here and not inside a transform
        image = ImageOps.exif_transpose(image)
    return to_model_mode(image, in_chans)


def resolve_split(root: str | Path, split: str) -> Path:
    """The folder of `split` for a `--data DIR` argument.

    DIR may be a dataset root holding `train/`, `val/` (...) or a class folder
    (`DIR/<class>/<image>`) used as-is for any split.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    if (root / split).is_dir():
        return root / split
    present = [name for name in SPLIT_NAMES if (root / name).is_dir()]
    if present:
        raise DataError(f"{root} has no '{split}' split (it has: {', '.join(present)})")
    if not any(entry.is_dir() for entry in root.iterdir()):
        raise DataError(f"{root} has neither a '{split}/' split nor class folders (expected {root}/<class>/<image>)")
    return root


class ImageFolderDataset(Dataset):
    """`root/<class>/<image>` -> (transform(image), class index), with robust decoding.

    Without a transform the sample is a PIL image in mode RGB ([H, W, 3]) or L when
    `in_chans == 1`. Class discovery and ordering are torchvision's (`find_classes`,
    `make_dataset`): folders sorted by name. See the module docstring for failures.
    """

    def __init__(self, root: str | Path, transform=None, in_chans: int = 3):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist")
        try:
            self.classes, self.class_to_idx = find_classes(self.root)
        except FileNotFoundError as err:
            raise DataError(f"{self.root} has no class folders (expected {self.root}/<class>/<image>)") from err
        self.samples: list[tuple[str, int]] = make_dataset(
            self.root, self.class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True
        )
        used = {target for _, target in self.samples}
        empty = [str(self.root / name) for name in self.classes if self.class_to_idx[name] not in used]
        if empty:
            raise DataError(
                f"class folder{'s' if len(empty) > 1 else ''} {', '.join(empty)} hold{'' if len(empty) > 1 else 's'} "
                f"no images (extensions: {' '.join(IMG_EXTENSIONS)})"
            )
        self.targets = [target for _, target in self.samples]
        self.transform = transform
        self.in_chans = in_chans
        # One flag per sample, in shared memory so DataLoader workers report to the trainer.
        self._failed = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        count = len(self.samples)
        for step in range(count):
            candidate = (index + step) % count
            if self._failed[candidate]:
                continue
            path, target = self.samples[candidate]
            try:
                image = load_image(path, self.in_chans)
            except _DECODE_ERRORS as err:
                self._failed[candidate] = 1
                logger.warning("skipping unreadable image %s (%s: %s); using the next sample", path, type(err).__name__, err)
                continue
            return (self.transform(image) if self.transform is not None else image), target
        raise DataError(f"no image under {self.root} could be read")

    @property
    def num_failed(self) -> int:
        """Distinct files that failed to decode so far, counted across DataLoader workers."""
        return int(self._failed.sum())

    def failed_paths(self) -> list[str]:
        return [self.samples[i][0] for i in torch.nonzero(self._failed).flatten().tolist()]

    def check_failures(self, total: int | None = None, max_fraction: float = MAX_BAD_FRACTION) -> int:
        """Raise DataError if more than `max_fraction` of `total` samples (default: all) failed
        (`errors.check_unreadable`). Returns the number of failed files otherwise.
        """
        failed = self.num_failed
        check_unreadable(failed, len(self) if total is None else total, self.root, self.failed_paths(), max_fraction)
        return failed


class SyntheticDataset(Dataset):
    """Random, already-normalised images for smoke runs and benchmarks; no files.

    Sample `index` is drawn from a generator seeded with `seed + index`, so it is the same in
    every worker, epoch and run. Returns (image [in_chans, H, W] float32 ~ N(0, 1), label int).
    """

    def __init__(self, num_samples: int, num_classes: int, img_size: int | tuple[int, int], in_chans: int = 3, seed: int = 0):
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.in_chans = in_chans
        self.seed = seed
        self.classes = [f"class_{i}" for i in range(num_classes)]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        index %= self.num_samples
        generator = torch.Generator().manual_seed(self.seed + index)
        image = torch.randn(self.in_chans, *self.img_size, generator=generator)
        label = int(torch.randint(self.num_classes, (), generator=generator))
        return image, label
