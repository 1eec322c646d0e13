"""Reproducible input pipeline for training: global-batch sampling, per-sample seeded
augmentation, and an in-memory uint8 cache with batch-level augmentation.

Why it is built this way (exact resume, DDP equivalence):

- The order of epoch e is `permutation(seed, e)`, drawn from its own generator, never from
  the global RNG. Global step s of the epoch takes `perm[s*G:(s+1)*G]` (G = global batch)
  and rank r takes the contiguous slice `[r*B:(r+1)*B]` of it, so 2 processes x batch B see
  exactly the images of 1 process x batch 2B. Resuming starts the sampler at the first
  unconsumed step: skipped batches are never loaded.
- The sampler yields keys `(epoch, index)`; a sample's random augmentation is seeded from
  `(seed, epoch, index)` alone, so it does not depend on worker count or scheduling.
- `CachedSplit` decodes a split once (`data.cache`) into `[N, C, H, W]` uint8; a training
  batch is then a tensor gather plus a random crop of the zero-padded image and a flip,
  both drawn from a hash of `(seed, epoch, index)`.
"""
from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from ..data import DataError, ImageFolderDataset


def derive_seed(*values: int) -> int:
    """A 63-bit seed from integers (e.g. seed, epoch, index); stable across processes and runs."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(2, np.uint64)[0] >> 1)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of `epoch`: a function of (seed, epoch) only."""
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch, 0x5EED))
    return torch.randperm(num_samples, generator=generator)


class GlobalBatchSampler:
    """Batch sampler over keys `(epoch, index)`; see the module docstring for the slicing rule.

    `steps_per_epoch` micro-batches per epoch (the last partial global batch is dropped, as
    is a tail shorter than `accumulation` micro-batches). `set_position(epoch, step)` picks
    where the next iteration starts.
    """

    def __init__(self, num_samples: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 accumulation: int = 1, shuffle: bool = True):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = (num_samples // self.global_batch) // accumulation * accumulation
        if self.steps_per_epoch == 0:
            raise DataError(f"the training split has {num_samples} samples, fewer than one optimizer step needs "
                            f"({self.global_batch} per micro-batch x {accumulation} accumulation); "
                            "lower the batch size")
        self.epoch, self.start_step = 0, 0

    def set_position(self, epoch: int, step: int = 0) -> None:
        self.epoch, self.start_step = epoch, step

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        order = epoch_permutation(self.num_samples, self.seed, epoch) if self.shuffle else torch.arange(self.num_samples)
        order = order.tolist()
        for step in range(self.start_step, self.steps_per_epoch):
            start = step * self.global_batch + self.rank * self.batch_size
            yield [(epoch, index) for index in order[start:start + self.batch_size]]


@contextlib.contextmanager
def seeded_rng(seed: int):
    """Run a block with torch's CPU generator and Python's `random` seeded to `seed`, then put
    both back as they were (the main process's RNG stream stays untouched)."""
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)


class SeededTransformDataset(Dataset):
    """`base[index]` -> (transform(image), label) for keys `(epoch, index)` (training; the
    transform's randomness seeded from (seed, epoch, index)) or plain `index` (evaluation)."""

    def __init__(self, base: Dataset, transform=None, seed: int = 0):
        self.base = base
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (None, key)
        image, label = self.base[index]
        if self.transform is None:
            return image, label
        if epoch is None:
            return self.transform(image), label
        with seeded_rng(derive_seed(self.seed, epoch, index)):
            return self.transform(image), label


class _DecodeToUint8:
    """PIL image -> uint8 [C, H, W] at `size` (resize shorter side to size / crop_pct, centre crop)."""

    def __init__(self, size: tuple[int, int], crop_pct: float, interpolation: str):
        resize = [math.floor(side / crop_pct) for side in size]
        resize = resize[0] if resize[0] == resize[1] and size[0] == size[1] else resize
        self.transform = v2.Compose([v2.Resize(resize, interpolation=InterpolationMode(interpolation.lower()), antialias=True),
                                     v2.CenterCrop(list(size)), v2.PILToTensor()])

    def __call__(self, image):
        return self.transform(image)


class CachedSplit:
    """A split held in memory: images uint8 `[N, C, H, W]`, labels int64 `[N]`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]):
        self.images = images
        self.labels = labels
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def decode(cls, dataset: ImageFolderDataset, size: tuple[int, int], *, crop_pct: float = 1.0,
               interpolation: str = "bicubic", workers: int = 0, batch_size: int = 256) -> "CachedSplit":
        """Decode every image of `dataset` once (unreadable files are replaced and flagged by the dataset)."""
        dataset.transform = _DecodeToUint8(tuple(size), crop_pct, interpolation)
        try:
            loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False,
                                generator=torch.Generator())
            images, labels = [], []
            for batch_images, batch_labels in loader:
                images.append(batch_images)
                labels.append(batch_labels)
        finally:
            dataset.transform = None
        return cls(torch.cat(images), torch.cat(labels).long(), dataset.classes)


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """A stateless 64-bit hash (SplitMix64's finaliser), elementwise on uint64."""
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def crop_flip_batch(images: torch.Tensor, keys: Sequence[tuple[int, int]], seed: int, padding: int,
                    hflip: float) -> torch.Tensor:
    """Random crop of the zero-padded image + horizontal flip, per sample from hash(seed, epoch, index).

    images: uint8 `[B, C, H, W]` -> uint8 `[B, C, H, W]`.
    """
    epochs = np.asarray([epoch for epoch, _ in keys], dtype=np.uint64)
    indices = np.asarray([index for _, index in keys], dtype=np.uint64)
    with np.errstate(over="ignore"):
        state = _splitmix64(np.uint64(derive_seed(seed, 0xC40F)) ^ _splitmix64(epochs * np.uint64(0x100000001B3)
                                                                             ^ indices))
    height, width = images.shape[-2:]
    span = 2 * padding + 1
    offset_y = (state % np.uint64(span)).astype(np.int64)
    offset_x = ((state >> np.uint64(16)) % np.uint64(span)).astype(np.int64)
    flips = ((state >> np.uint64(40)) & np.uint64(0xFFFFFF)).astype(np.float64) / float(1 << 24) < hflip
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    out = torch.empty_like(images)
    for i in range(images.shape[0]):
        crop = padded[i, :, offset_y[i]:offset_y[i] + height, offset_x[i]:offset_x[i] + width]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


class CachedTrainLoader:
    """Iterates a `GlobalBatchSampler` over a `CachedSplit`: (normalised float images, labels) per batch."""

    def __init__(self, split: CachedSplit, sampler: GlobalBatchSampler, mean, std, *, augment: bool, seed: int,
                 padding: int, hflip: float):
        self.split = split
        self.sampler = sampler
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.augment, self.seed, self.padding, self.hflip = augment, seed, padding, hflip

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for keys in self.sampler:
            index = torch.tensor([i for _, i in keys])
            images = self.split.images[index]
            if self.augment:
                images = crop_flip_batch(images, keys, self.seed, self.padding, self.hflip)
            yield normalize(images, self.mean, self.std), self.split.labels[index]


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 `[B, C, H, W]` -> float32 (x / 255 - mean) / std."""
    return (images.float().div_(255.0) - mean) / std


class CachedEvalLoader:
    """Batches of a (shard of a) `CachedSplit` in order, normalised."""

    def __init__(self, split: CachedSplit, indices: Sequence[int], batch_size: int, mean, std):
        self.split, self.indices, self.batch_size = split, torch.as_tensor(list(indices), dtype=torch.long), batch_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.indices), self.batch_size):
            index = self.indices[start:start + self.batch_size]
            yield normalize(self.split.images[index], self.mean, self.std), self.split.labels[index]


def shard_indices(num_samples: int, world_size: int, rank: int) -> list[int]:
    """Rank r evaluates samples r, r + W, ...: every sample exactly once across ranks, no padding."""
    return list(range(rank, num_samples, world_size))
