"""Data: image-folder and synthetic datasets, Fashion-MNIST import, transforms."""
from .datasets import ImageFolderDataset, SyntheticDataset, load_image, resolve_split, to_model_mode
from .errors import DataError
from .fashion_mnist import import_fashion_mnist, read_idx, read_idx_header
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MixupCutmix,
    build_eval_transform,
    build_mixup_cutmix,
    build_train_transform,
    parse_rand_augment,
)

__all__ = [
    "DataError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderDataset",
    "MixupCutmix",
    "SyntheticDataset",
    "build_eval_transform",
    "build_mixup_cutmix",
    "build_train_transform",
    "import_fashion_mnist",
    "load_image",
    "parse_rand_augment",
    "read_idx",
    "read_idx_header",
    "resolve_split",
    "to_model_mode",
]
