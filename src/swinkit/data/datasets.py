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
import math
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension

from .errors import MAX_BAD_FRACTION, DataError, check_unreadable

logger = logging.getLogger(__name__)

# What a corrupt, truncated, huge or non-image file raises inside PIL (or `load_image`'s DataError, a ValueError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError,
                  MemoryError)
# Bounds on what one image file may cost: the pixels decoded (10000 x 10000; a 16-bit image then costs
# about 2 bytes a pixel while decoding, an RGB one 3), and how elongated it may be (a 1 x 100000 strip
# resized to a 256-pixel shorter side would be 25.6 G pixels).
MAX_IMAGE_PIXELS = 100_000_000
MAX_ASPECT_RATIO = 100
# Above this many pixels, an image whose caller needs less is decoded smaller (JPEG `draft`) and
# shrunk by an integer factor (`Image.reduce`) before its transform; ordinary photos are untouched.
_LARGE_IMAGE_PIXELS = 4096 * 4096
_STRIP_PIXELS = 1 << 22  # 16/32-bit and float images are converted to 8 bits this many pixels at a time
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
        image = _wide_to_uint8(image)
    elif mode in _ALPHA_MODES or "transparency" in image.info:
        image = _flatten_alpha(image)
    return image if image.mode == target else image.convert(target)


def _strips(image: Image.Image):
    """(first row, rows as a numpy array) of `image`, a few megapixels at a time."""
    width, height = image.size
    rows = max(1, _STRIP_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        yield top, np.asarray(image.crop((0, top, width, min(top + rows, height))))


def _wide_to_uint8(image: Image.Image) -> Image.Image:
    """A 16/32-bit integer or float image -> 'L' (see `to_model_mode`), a strip at a time: the float64
    work happens on a few megapixels, never on a full-size copy."""
    scale = 1.0
    if image.mode == "F":
        peaks = [np.fmax.reduce(values, axis=None) for _, values in _strips(image) if values.size]
        peak = np.fmax.reduce(np.asarray(peaks, dtype=np.float64)) if peaks else math.nan
        scale = 255.0 if peak <= 1.0 else 1.0
    out = Image.new("L", image.size)
    for top, values in _strips(image):
        if image.mode == "F":
            values = values.astype(np.float64) * scale if scale != 1.0 else values.astype(np.float64)
            values = np.nan_to_num(values).round()
        else:  # 65535 -> 255, rounded to nearest (x / 257 is never exactly halfway)
            values = (values.astype(np.int64) + 128) // 257
        out.paste(Image.fromarray(values.clip(0, 255).astype(np.uint8)), (0, top))
    return out


def _check_size(path: str | Path, size: tuple[int, int], min_side: int | None) -> None:
    width, height = size
    if min(width, height) < 1:
        raise DataError(f"image {path} has no pixels ({width}x{height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(f"image {path} is {width}x{height} = {width * height:,} pixels, more than the "
                        f"{MAX_IMAGE_PIXELS:,} swinkit decodes")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise DataError(f"image {path} is {width}x{height}, more elongated than the 1:{MAX_ASPECT_RATIO} "
                        "swinkit accepts")
    if min_side is not None and min_side ** 2 * ratio > MAX_IMAGE_PIXELS:
        raise DataError(f"image {path} is {width}x{height}: with its shorter side resized to {min_side} it would "
                        f"have more than {MAX_IMAGE_PIXELS:,} pixels")


def load_image(path: str | Path, in_chans: int = 3, *, min_side: int | None = None) -> Image.Image:
    """Decode an image file fully, apply its EXIF orientation, convert with `to_model_mode`.

    `min_side`: the size the caller resizes the image to next (`Preprocess.resize_side`). An image of more
    than 4096 x 4096 pixels then comes back smaller, its shorter side still at least `min_side` (a JPEG is
    decoded at 1/2, 1/4 or 1/8 scale, anything else shrunk by an integer factor), and one so elongated
    that the resize would exceed `MAX_IMAGE_PIXELS` is refused.

    Raises `DataError` naming the file for an image of more than `MAX_IMAGE_PIXELS` pixels or more
    elongated than 1:`MAX_ASPECT_RATIO`, and whatever PIL raises for an unreadable file (OSError,
    SyntaxError, ...).
    """
    with warnings.catch_warnings():  # swinkit's own cap (below) replaces PIL's decompression-bomb warning
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            opened = Image.open(path)
        except Image.DecompressionBombError as error:
            raise DataError(f"image {path} has more than the {MAX_IMAGE_PIXELS:,} pixels swinkit decodes "
                            f"({error})") from None
    with opened as image:
        width, height = image.size
        if min_side and image.format == "JPEG" and width * height > _LARGE_IMAGE_PIXELS:
            scale = min_side / max(min(width, height), 1)
            if scale <= 0.5:
                image.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
        _check_size(path, image.size, min_side)
        image.load()  # decode now, so a truncated file fails here and not inside a transform
        image = ImageOps.exif_transpose(image)
    image = to_model_mode(image, in_chans)
    if min_side and image.width * image.height > _LARGE_IMAGE_PIXELS:
        factor = min(image.size) // min_side
        if factor >= 2:
            image = image.reduce(factor)
    return image


def _has_subfolders(folder: Path) -> bool:
    return any(entry.is_dir() for entry in folder.iterdir())


def resolve_split(root: str | Path, split: str, *, unlabelled: bool = False) -> Path:
    """The folder of `split` for a `--data DIR` argument.

    DIR may be a dataset root holding `train/`, `val/` (...) or a class folder
    (`DIR/<class>/<image>`) used as-is for any split; `unlabelled` (pre-training), also a
    folder of images alone.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    if (root / split).is_dir():
        return root / split
    present = [name for name in SPLIT_NAMES if (root / name).is_dir()]
    if present:
        raise DataError(f"{root} has no '{split}' split (it has: {', '.join(present)})")
    if not unlabelled and not _has_subfolders(root):
        raise DataError(f"{root} has neither a '{split}/' split nor class folders (expected {root}/<class>/<image>)")
    return root


def _image_samples(root: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """(image path, class index) under `root/<class>/`, in torchvision's `make_dataset` order (classes sorted,
    then folders by path, then file names), following links, but reading each folder once per class.

    A folder reached again through a link is skipped with a warning; a link back into its own ancestry (a
    loop, which `os.walk(followlinks=True)` follows until the path is too long, counting every image many
    times) raises `DataError` naming it.
    """
    samples: list[tuple[str, int]] = []
    top_id = _folder_id(str(root))
    for name in sorted(class_to_idx):
        top = os.path.join(root, name)
        if not os.path.isdir(top):
            continue
        folders: list[tuple[str, list[str]]] = []
        visited: set[tuple[int, int]] = set()
        stack = [(top, ((top_id, str(root)),))]
        while stack:
            path, ancestors = stack.pop()
            try:
                ident = _folder_id(path)
                entries = list(os.scandir(path))
            except OSError:  # unreadable folder: skipped, as os.walk does
                continue
            loop = next((folder for folder_id, folder in ancestors if folder_id == ident), None)
            if loop is not None:
                raise DataError(f"image folder {root} has a link loop: {path} leads back to {loop}")
            if ident in visited:
                logger.warning("%s is a folder already read under %s (through a link); its images count once",
                               path, top)
                continue
            visited.add(ident)
            folders.append((path, sorted(entry.name for entry in entries if not _is_dir(entry)
                                         and has_file_allowed_extension(entry.name, IMG_EXTENSIONS))))
            stack += [(entry.path, ancestors + ((ident, path),)) for entry in entries if _is_dir(entry)]
        for path, files in sorted(folders):
            samples += [(os.path.join(path, file), class_to_idx[name]) for file in files]
    return samples


def _folder_id(path: str) -> tuple[int, int]:
    info = os.stat(path)  # follows links: a linked folder has its target's identity
    return info.st_dev, info.st_ino


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


class ImageFolderDataset(Dataset):
    """`root/<class>/<image>` -> (transform(image), class index), with robust decoding.

    Without a transform the sample is a PIL image in mode RGB ([H, W, 3]) or L when
    `in_chans == 1`. Class discovery and ordering are torchvision's (`find_classes`,
    `make_dataset`): folders sorted by name. See the module docstring for failures.
    """

    def __init__(self, root: str | Path, transform=None, in_chans: int = 3, *, unlabelled: bool = False):
        """`unlabelled` (pre-training): a folder of images without class folders is one class."""
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist")
        if unlabelled and not _has_subfolders(self.root):
            self.classes, self.class_to_idx = [self.root.name], {self.root.name: 0}
            self.samples: list[tuple[str, int]] = _image_samples(self.root.parent, self.class_to_idx)
        else:
            try:
                self.classes, self.class_to_idx = find_classes(self.root)
            except FileNotFoundError as err:
                raise DataError(f"{self.root} has no class folders (expected {self.root}/<class>/<image>)") from err
            self.samples = _image_samples(self.root, self.class_to_idx)
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

    def keep(self, indices) -> None:
        """Restrict the dataset to the samples at `indices` (e.g. a few-label subset), in that order."""
        indices = [int(i) for i in indices]
        self.samples = [self.samples[i] for i in indices]
        self.targets = [self.targets[i] for i in indices]
        self._failed = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

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
