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

`build_training_data(config, ...)` puts these together for the trainer; `UnreadableImages`
counts the files an image folder could not decode, over all ranks.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from ..data import (DataError, ImageFolderDataset, SyntheticDataset, build_eval_transform, build_mixup_cutmix,
                    build_train_transform, resolve_split)
from ..data.errors import check_unreadable
from . import distributed
from .config import DataSection, TrainConfig
from .signals import ignore_stop_signals_in_worker

log = logging.getLogger("swinkit.train")


def derive_seed(*values: int) -> int:
    """A 63-bit seed from integers (e.g. seed, epoch, index); stable across processes and runs."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(2, np.uint64)[0] >> 1)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of `epoch`: a function of (seed, epoch) only."""
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch, 0x5EED))
    return torch.randperm(num_samples, generator=generator)


class GlobalBatchSampler:
    """Batch sampler over keys `(epoch, index)`; see the module docstring for the slicing rule.

    `batches_per_epoch` micro-batches per epoch (the last partial global batch is dropped, as
    is a tail shorter than `accumulation` micro-batches). `set_position(epoch, step)` picks
    the micro-batch where the next iteration starts.
    """

    def __init__(self, num_samples: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 accumulation: int = 1):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = (num_samples // self.global_batch) // accumulation * accumulation
        if self.batches_per_epoch == 0:
            raise DataError(f"the training split has {num_samples} samples, fewer than one optimizer step needs "
                            f"({self.global_batch} per micro-batch x {accumulation} accumulation); "
                            "lower the batch size")
        self.epoch, self.start_step = 0, 0

    def set_position(self, epoch: int, step: int = 0) -> None:
        self.epoch, self.start_step = epoch, step

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        order = epoch_permutation(self.num_samples, self.seed, epoch).tolist()
        for step in range(self.start_step, self.batches_per_epoch):
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

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images
        self.labels = labels

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
        return cls(torch.cat(images), torch.cat(labels).long())


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


# ---------------------------------------------------------------------------------- for the trainer
def few_label_indices(targets: Sequence[int], per_class: int, seed: int, root=None, classes=None) -> list[int]:
    """A fixed, class-balanced subset: `per_class` samples of every class, drawn by a generator seeded
    with `seed` alone (the same subset for every run, process count and epoch), in index order."""
    targets = torch.as_tensor(list(targets), dtype=torch.long)
    generator = torch.Generator().manual_seed(derive_seed(seed, 0x5EED_1ABE1))
    chosen = []
    for label in range(int(targets.max()) + 1 if len(targets) else 0):
        members = torch.nonzero(targets == label).flatten()
        if len(members) < per_class:
            name = classes[label] if classes is not None else label
            raise DataError(f"data.labels_per_class is {per_class} but class '{name}' of {root} has only "
                            f"{len(members)} images")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return sorted(torch.cat(chosen).tolist()) if chosen else []


def open_image_folders(data: DataSection, seed: int = 0, *, unlabelled: bool = False
                       ) -> tuple[ImageFolderDataset | None, ImageFolderDataset | None]:
    """The train and val image folders under `data.path` (val None without `data.val_split`; both
    None for synthetic data). Both splits must hold the same classes. With `data.labels_per_class`,
    the train folder keeps its few-label subset (`few_label_indices`, seeded by `seed`). `unlabelled`
    (pre-training): folders of images without class folders are accepted, and class folders of the
    two splits need not agree."""
    if data.synthetic:
        return None, None
    train = ImageFolderDataset(resolve_split(data.path, data.train_split, unlabelled=unlabelled),
                               unlabelled=unlabelled)
    if data.labels_per_class is not None:
        train.keep(few_label_indices(train.targets, data.labels_per_class, seed, train.root, train.classes))
    val = ImageFolderDataset(resolve_split(data.path, data.val_split, unlabelled=unlabelled),
                             unlabelled=unlabelled) if data.val_split else None
    if val is not None and val.classes != train.classes and not unlabelled:
        raise DataError(f"{val.root} has classes {val.classes[:5]}... but {train.root} has "
                        f"{train.classes[:5]}...; both splits need the same class folders")
    return train, val


@dataclass
class TrainingData:
    """What the training loop reads: `sampler` (its position is the loop's), batches of
    (images `[B, C, H, W]`, labels `[B]`) from `train_loader` and `val_loader` (None without a
    val split), and `mix` (mixup / cutmix: labels -> soft targets `[B, num_classes]`, or None)."""
    sampler: GlobalBatchSampler
    train_loader: Iterable
    val_loader: Iterable | None
    mix: Callable | None


def build_training_data(config: TrainConfig, preprocess, env: distributed.DistEnv, num_classes: int,
                        train_folder: ImageFolderDataset | None,
                        val_folder: ImageFolderDataset | None) -> TrainingData:
    """Loaders over the image folders (or, with `data.synthetic`, synthetic data), this rank's share.

    `preprocess` (img_size, in_chans, mean, std, crop_pct, interpolation) is the model's input;
    `data.cache` decodes both splits into memory here, once."""
    data, aug, seed, pre = config.data, config.augment, config.train.seed, preprocess
    if data.synthetic:
        train_set = SyntheticDataset(data.synthetic_train_size, num_classes, pre.img_size, pre.in_chans, seed=seed)
        val_set = SyntheticDataset(data.synthetic_val_size, num_classes, pre.img_size, pre.in_chans,
                                   seed=seed + 1_000_003) if data.val_split else None
    else:
        train_set, val_set = train_folder, val_folder
        for folder in (train_folder, val_folder):
            if folder is not None:
                folder.in_chans = pre.in_chans
    sampler = GlobalBatchSampler(len(train_set), config.train.batch_size, env.world_size, env.rank, seed,
                                 config.optim.accumulation_steps)
    if data.cache and not data.synthetic:
        train_loader, val_loader = _cached_loaders(config, pre, env, sampler, train_set, val_set)
    else:
        train_loader, val_loader = _streaming_loaders(config, pre, env, sampler, train_set, val_set)
    mixing = aug.enabled and (aug.mixup > 0 or aug.cutmix > 0) and aug.mix_prob > 0
    mix = build_mixup_cutmix(num_classes, aug.mixup, aug.cutmix, aug.mix_prob, aug.switch_prob,
                             aug.label_smoothing) if mixing else None
    return TrainingData(sampler, train_loader, val_loader, mix)


def _cached_loaders(config: TrainConfig, pre, env: distributed.DistEnv, sampler: GlobalBatchSampler,
                    train_set: ImageFolderDataset, val_set: ImageFolderDataset | None):
    data, aug = config.data, config.augment
    started = time.perf_counter()
    train_cache = CachedSplit.decode(train_set, pre.img_size, crop_pct=1.0, interpolation=pre.interpolation,
                                     workers=data.workers)
    train_loader = CachedTrainLoader(train_cache, sampler, pre.mean, pre.std, augment=aug.enabled,
                                     seed=config.train.seed, padding=aug.crop_padding, hflip=aug.hflip)
    val_loader = None
    if val_set is not None:
        val_cache = CachedSplit.decode(val_set, pre.img_size, crop_pct=pre.crop_pct, interpolation=pre.interpolation,
                                       workers=data.workers)
        val_loader = CachedEvalLoader(val_cache, shard_indices(len(val_cache), env.world_size, env.rank),
                                      config.train.batch_size, pre.mean, pre.std)
    if env.is_main:
        log.info("decoded %d + %d images into memory in %.1f s", len(train_cache),
                 len(val_set) if val_set is not None else 0, time.perf_counter() - started)
    return train_loader, val_loader


def _streaming_loaders(config: TrainConfig, pre, env: distributed.DistEnv, sampler: GlobalBatchSampler,
                       train_set, val_set):
    data, aug, workers = config.data, config.augment, config.data.workers
    train_transform = val_transform = None
    if not data.synthetic:  # synthetic samples are model inputs already
        train_transform = build_train_transform(
            pre.img_size, pre.mean, pre.std, in_chans=pre.in_chans, augment=aug.enabled, scale=tuple(aug.scale),
            hflip=aug.hflip, rand_augment=aug.rand_augment, random_erasing=aug.random_erasing,
            interpolation=pre.interpolation)
        val_transform = build_eval_transform(pre.img_size, pre.mean, pre.std, crop_pct=pre.crop_pct,
                                             interpolation=pre.interpolation, in_chans=pre.in_chans)
    pin = env.device.type == "cuda"
    train_loader = DataLoader(
        SeededTransformDataset(train_set, train_transform, config.train.seed), batch_sampler=sampler,
        num_workers=workers, pin_memory=pin, persistent_workers=workers > 0, generator=torch.Generator(),
        worker_init_fn=ignore_stop_signals_in_worker)  # a stop request is the main process's to handle
    val_loader = None if val_set is None else DataLoader(
        SeededTransformDataset(val_set, val_transform), batch_size=config.train.batch_size,
        sampler=shard_indices(len(val_set), env.world_size, env.rank), num_workers=workers,
        pin_memory=pin, generator=torch.Generator(), worker_init_fn=ignore_stop_signals_in_worker)
    return train_loader, val_loader


class UnreadableImages:
    """Files of the image folders that could not be decoded (each dataset replaces and flags them)."""

    def __init__(self, folders: Sequence[ImageFolderDataset | None], max_fraction: float):
        self.folders = [folder for folder in folders if folder is not None]
        self.max_fraction = max_fraction
        self.reported: list[str] = []

    def check(self, env: distributed.DistEnv) -> int:
        """The count so far over all ranks; more than `max_fraction` of a folder -> DataError (on every rank)."""
        if not self.folders:
            return 0
        counts = distributed.all_reduce_sum([float(folder.num_failed) for folder in self.folders], env)
        for folder, failed in zip(self.folders, counts):
            check_unreadable(int(failed), len(folder), folder.root, folder.failed_paths(), self.max_fraction)
        return int(sum(counts))

    def report(self) -> None:
        """Log this rank's unreadable files when the list has changed."""
        names = [path for folder in self.folders for path in folder.failed_paths()]
        if names and names != self.reported:
            log.warning("skipped %d unreadable image(s) so far: %s", len(names), ", ".join(names[:10]))
            self.reported = names
