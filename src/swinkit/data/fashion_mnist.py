"""Fashion-MNIST IDX files -> an image-folder dataset (`swinkit data fashion-mnist`).

The Debian package `dataset-fashion-mnist` installs the four gzip'd IDX files under
/usr/share/datasets/fashion-mnist. `import_fashion_mnist` turns them into

    out_dir/train/<class>/<index>.png   60,000 images (official training split)
    out_dir/val/<class>/<index>.png     10,000 images (official test split)
    out_dir/classes.json                folder names, display names, official label ids, counts

which `ImageFolderDataset` reads like any other dataset. Class indices follow the
image-folder convention (folders sorted by name), not the official label ids; both are
recorded in classes.json. The folder is built next to `out_dir` and renamed into place,
so an interrupted import leaves no half-written `out_dir`.

This module does not import torch: the PNG writers run in a small process pool and
should start fast.
"""
from __future__ import annotations

import gzip
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataError

logger = logging.getLogger(__name__)

DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "apt-get install dataset-fashion-mnist"

# (filesystem-safe folder name, display name), in official label-id order 0..9.
CLASSES: tuple[tuple[str, str], ...] = (
    ("T-shirt_top", "T-shirt/top"),
    ("Trouser", "Trouser"),
    ("Pullover", "Pullover"),
    ("Dress", "Dress"),
    ("Coat", "Coat"),
    ("Sandal", "Sandal"),
    ("Shirt", "Shirt"),
    ("Sneaker", "Sneaker"),
    ("Bag", "Bag"),
    ("Ankle_boot", "Ankle boot"),
)

# split -> (images file stem, labels file stem, number of samples)
SPLITS: dict[str, tuple[str, str, int]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}
IMAGE_SHAPE = (28, 28)

# IDX type codes (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ---------------------------------------------------------------------------- IDX


def _open_idx(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _parse_header(path: Path, head: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """Magic and dims from the first bytes of an IDX file -> (dtype, shape, header length)."""
    if len(head) < 4:
        raise DataError(f"{path}: not an IDX file (only {len(head)} bytes)")
    zero, type_code, ndim = int.from_bytes(head[:2], "big"), head[2], head[3]
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{path}: not an IDX file (magic number 0x{head[:4].hex()})")
    header_len = 4 + 4 * ndim
    if len(head) < header_len:
        raise DataError(f"{path}: IDX header truncated ({len(head)} of {header_len} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(head[4:header_len], dtype=">u4"))
    return np.dtype(_IDX_DTYPES[type_code]), shape, header_len


def read_idx_header(path: str | Path) -> tuple[np.dtype, tuple[int, ...]]:
    """Dtype and shape of an IDX file (gzip'd or not), reading only its header."""
    path = Path(path)
    try:
        with _open_idx(path) as f:
            head = f.read(4)
            head += f.read(4 * head[3]) if len(head) == 4 else b""
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot read IDX file ({err})") from err
    dtype, shape, _ = _parse_header(path, head)
    return dtype, shape


def read_idx(path: str | Path) -> np.ndarray:
    """Whole IDX file (gzip'd or not) as a native-endian numpy array of its declared shape."""
    path = Path(path)
    try:
        with _open_idx(path) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot read IDX file ({err})") from err
    dtype, shape, header_len = _parse_header(path, raw[: 4 + 4 * 255])
    expected = header_len + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"{path}: IDX header declares shape {list(shape)} ({expected} bytes) "
            f"but the file holds {len(raw)} bytes"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=False)


def _find(source: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (source / name).is_file():
            return source / name
    raise DataError(
        f"Fashion-MNIST file {source / (stem + '.gz')} not found; "
        f"install it with `{INSTALL_HINT}` or pass the folder that holds it"
    )


def load_split(source: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Checked (images [N, 28, 28] uint8, labels [N] uint8) of one official split."""
    source = Path(source)
    images_stem, labels_stem, count = SPLITS[split]
    images_path, labels_path = _find(source, images_stem), _find(source, labels_stem)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.shape != (count, *IMAGE_SHAPE):
        raise DataError(
            f"{images_path}: expected {count} uint8 images of {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}, "
            f"found {images.dtype} {list(images.shape)}"
        )
    if labels.dtype != np.uint8 or labels.shape != (count,):
        raise DataError(f"{labels_path}: expected {count} uint8 labels, found {labels.dtype} {list(labels.shape)}")
    if labels.max() >= len(CLASSES):
        raise DataError(f"{labels_path}: label {int(labels.max())} is outside 0..{len(CLASSES) - 1}")
    return images, labels


# ---------------------------------------------------------------------------- import


def _write_pngs(job: tuple[str, np.ndarray, np.ndarray, int]) -> int:
    """Pool worker: one chunk of a split -> PNG files. Returns how many were written."""
    split_dir, images, labels, start = job
    for offset, (image, label) in enumerate(zip(images, labels)):
        folder = CLASSES[label][0]
        Image.fromarray(image).save(os.path.join(split_dir, folder, f"{start + offset:05d}.png"))
    return len(images)


def _complete_counts(out_dir: Path) -> dict[str, int] | None:
    """Per-split totals if `out_dir` holds a finished import (per-class PNG counts match classes.json)."""
    try:
        meta = json.loads((out_dir / "classes.json").read_text())
        totals = {}
        for split, per_class in meta["counts"].items():
            for folder, expected in per_class.items():
                with os.scandir(out_dir / split / folder) as entries:
                    if sum(entry.name.endswith(".png") for entry in entries) != expected:
                        return None
            totals[split] = sum(per_class.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return totals if set(totals) == set(SPLITS) else None


def _class_table() -> list[dict]:
    """Classes in image-folder index order (sorted folder names), with official label ids."""
    by_folder = {folder: (label, name) for label, (folder, name) in enumerate(CLASSES)}
    return [
        {"index": index, "folder": folder, "name": by_folder[folder][1], "fashion_mnist_label": by_folder[folder][0]}
        for index, folder in enumerate(sorted(by_folder))
    ]


def import_fashion_mnist(out_dir: str | Path, source: str | Path = DEFAULT_SOURCE, *, workers: int = 2) -> dict:
    """Convert the Fashion-MNIST IDX files in `source` into an image-folder dataset at `out_dir`.

    Returns {"out_dir", "train", "val", "classes", "seconds", "skipped", "message"}; "classes"
    lists folder names in class-index order. If `out_dir` already holds a complete import,
    nothing is written and "skipped" is True. A non-empty `out_dir` that is not a complete
    import is refused rather than overwritten.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    classes = [row["folder"] for row in _class_table()]
    started = time.perf_counter()

    existing = _complete_counts(out_dir) if out_dir.is_dir() else None
    if existing is not None:
        message = f"{out_dir} already holds a complete Fashion-MNIST import ({existing['train']} train, {existing['val']} val); skipped"
        logger.info(message)
        return {"out_dir": str(out_dir), **existing, "classes": classes, "seconds": 0.0, "skipped": True, "message": message}
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir} exists and is not a complete Fashion-MNIST import; remove it or choose another output folder")

    splits = {split: load_split(source, split) for split in SPLITS}  # validate everything before writing

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        jobs = []
        for split, (images, labels) in splits.items():
            for folder, _ in CLASSES:
                (tmp_dir / split / folder).mkdir(parents=True)
            chunk = -(-len(images) // (8 * max(workers, 1)))
            jobs += [
                (str(tmp_dir / split), images[i : i + chunk], labels[i : i + chunk], i)
                for i in range(0, len(images), chunk)
            ]
        if workers > 1:
            # fork starts in milliseconds and the workers only need numpy + PIL.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with multiprocessing.get_context(method).Pool(workers) as pool:
                written = sum(pool.imap_unordered(_write_pngs, jobs))
        else:
            written = sum(map(_write_pngs, jobs))
        assert written == sum(len(labels) for _, labels in splits.values())

        counts = {
            split: {CLASSES[label][0]: int(n) for label, n in enumerate(np.bincount(labels, minlength=len(CLASSES)))}
            for split, (_, labels) in splits.items()
        }
        meta = {"dataset": "fashion-mnist", "source": str(Path(source).absolute()), "classes": _class_table(), "counts": counts}
        (tmp_dir / "classes.json").write_text(json.dumps(meta, indent=2) + "\n")
        tmp_dir.chmod(0o755)  # mkdtemp makes it private
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above); rename needs the name free on every OS
        os.rename(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise

    seconds = time.perf_counter() - started
    totals = {split: len(labels) for split, (_, labels) in splits.items()}
    message = f"imported Fashion-MNIST into {out_dir}: {totals['train']} train, {totals['val']} val images in {seconds:.1f} s"
    logger.info(message)
    return {"out_dir": str(out_dir), **totals, "classes": classes, "seconds": seconds, "skipped": False, "message": message}
