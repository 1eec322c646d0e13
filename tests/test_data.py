"""swinkit.data: IDX import, robust image folders, synthetic data, transforms, MixUp/CutMix."""
from __future__ import annotations

import gzip
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from swinkit.data import (
    DataError,
    ImageFolderDataset,
    SyntheticDataset,
    build_eval_transform,
    build_mixup_cutmix,
    build_train_transform,
    load_image,
    parse_rand_augment,
    read_idx,
    read_idx_header,
    resolve_split,
)
from swinkit.data import fashion_mnist

REAL_FASHION_MNIST = Path(fashion_mnist.DEFAULT_SOURCE)


def write_idx(path: Path, array: np.ndarray, *, compress: bool = True) -> Path:
    """A minimal IDX writer (ubyte data) for tests."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def fake_fashion_mnist(source: Path, counts: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    source.mkdir(parents=True, exist_ok=True)
    for split, (images_stem, labels_stem, _) in fashion_mnist.SPLITS.items():
        n = counts[split]
        write_idx(source / f"{images_stem}.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(source / f"{labels_stem}.gz", np.arange(n, dtype=np.uint8) % 10)


@pytest.fixture
def small_splits(monkeypatch):
    """Shrink the expected Fashion-MNIST split sizes so a fake source imports in milliseconds."""
    counts = {"train": 30, "val": 20}
    splits = {split: (images, labels, counts[split]) for split, (images, labels, _) in fashion_mnist.SPLITS.items()}
    monkeypatch.setattr(fashion_mnist, "SPLITS", splits)
    return counts


# ---------------------------------------------------------------------------- IDX / Fashion-MNIST


def test_idx_roundtrip_gzip_and_plain(tmp_path):
    array = np.arange(5 * 3 * 4, dtype=np.uint8).reshape(5, 3, 4)
    for compress in (True, False):
        path = write_idx(tmp_path / f"x-{compress}.idx{'.gz' if compress else ''}", array, compress=compress)
        assert np.array_equal(read_idx(path), array)
        dtype, shape = read_idx_header(path)
        assert dtype == np.uint8 and shape == (5, 3, 4)


def test_idx_bad_magic_and_wrong_size_name_the_file(tmp_path):
    bad_magic = tmp_path / "bad-magic.gz"
    bad_magic.write_bytes(gzip.compress(b"\x12\x34\x08\x01" + b"\x00" * 8))
    with pytest.raises(DataError, match="bad-magic.gz.*magic"):
        read_idx(bad_magic)

    short = tmp_path / "short.gz"
    header = bytes([0, 0, 0x08, 1]) + np.asarray([10], dtype=">u4").tobytes()
    short.write_bytes(gzip.compress(header + b"\x00" * 7))
    with pytest.raises(DataError, match="short.gz.*declares shape \\[10\\]"):
        read_idx(short)

    not_gzip = tmp_path / "noise.gz"
    not_gzip.write_bytes(b"definitely not gzip")
    with pytest.raises(DataError, match="noise.gz"):
        read_idx(not_gzip)


@pytest.mark.skipif(not REAL_FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_headers_parse():
    for split, (images_stem, labels_stem, count) in fashion_mnist.SPLITS.items():
        assert read_idx_header(REAL_FASHION_MNIST / f"{images_stem}.gz") == (np.dtype(np.uint8), (count, 28, 28))
        assert read_idx_header(REAL_FASHION_MNIST / f"{labels_stem}.gz") == (np.dtype(np.uint8), (count,))
    assert (fashion_mnist.SPLITS["train"][2], fashion_mnist.SPLITS["val"][2]) == (60_000, 10_000)


def test_fashion_mnist_import_writes_image_folders_and_skips_when_complete(tmp_path, small_splits, caplog):
    source = tmp_path / "src"
    fake_fashion_mnist(source, small_splits)
    out = tmp_path / "fmnist"
    result = fashion_mnist.import_fashion_mnist(out, source, workers=2)
    assert (result["train"], result["val"], result["skipped"]) == (30, 20, False)
    assert len(list((out / "train").rglob("*.png"))) == 30
    assert len(list((out / "val").rglob("*.png"))) == 20
    meta = json.loads((out / "classes.json").read_text())
    assert [row["folder"] for row in meta["classes"]] == sorted(folder for folder, _ in fashion_mnist.CLASSES)
    assert {row["name"] for row in meta["classes"]} >= {"T-shirt/top", "Ankle boot"}
    # label 3 (Dress) at index 13 of the training split; pixels survive the PNG round trip
    images = read_idx(source / "train-images-idx3-ubyte.gz")
    assert np.array_equal(np.asarray(Image.open(out / "train" / "Dress" / "00013.png")), images[13])
    dataset = ImageFolderDataset(out / "train", in_chans=1)
    assert dataset.classes == result["classes"] and len(dataset) == 30
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    with caplog.at_level(logging.INFO):
        again = fashion_mnist.import_fashion_mnist(out, source)
    assert again["skipped"] and "already holds a complete" in caplog.text


def test_fashion_mnist_import_refuses_foreign_folder_and_missing_files(tmp_path, small_splits):
    source = tmp_path / "src"
    fake_fashion_mnist(source, small_splits)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a complete Fashion-MNIST import"):
        fashion_mnist.import_fashion_mnist(foreign, source)
    assert (foreign / "notes.txt").read_text() == "keep me"

    (source / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.import_fashion_mnist(tmp_path / "out", source)
    assert not (tmp_path / "out").exists()


def test_interrupted_fashion_mnist_import_leaves_nothing(tmp_path, small_splits, monkeypatch):
    source = tmp_path / "src"
    fake_fashion_mnist(source, small_splits)

    def interrupted(job):
        raise KeyboardInterrupt

    monkeypatch.setattr(fashion_mnist, "_write_pngs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fashion_mnist.import_fashion_mnist(tmp_path / "out", source, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ---------------------------------------------------------------------------- image folders


def _save(image: Image.Image, path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def test_every_image_mode_loads_as_rgb_with_exif_orientation(tmp_path):
    root = tmp_path / "modes"
    gray = Image.new("L", (16, 12), 200)
    _save(gray, root / "a" / "l.png")
    _save(Image.new("LA", (16, 12), (10, 0)), root / "a" / "la.png")  # fully transparent -> white
    _save(Image.new("RGB", (16, 12), (255, 0, 0)).convert("P", palette=Image.Palette.ADAPTIVE), root / "a" / "p.png")
    _save(Image.new("RGBA", (16, 12), (0, 0, 255, 0)), root / "a" / "rgba.png")
    _save(Image.new("CMYK", (16, 12), (0, 255, 255, 0)), root / "b" / "cmyk.jpg")
    _save(Image.fromarray(np.full((12, 16), 65535, dtype=np.uint16)), root / "b" / "i16.png")
    _save(Image.fromarray(np.full((12, 16), 0.5, dtype=np.float32)), root / "b" / "f.tiff")
    # Stored 40x20 with red left / blue right; EXIF orientation 6 = rotate 90 degrees clockwise.
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(stored, root / "b" / "rotated.jpg", exif=exif, quality=95)

    dataset = ImageFolderDataset(root)
    assert len(dataset) == 8 and dataset.classes == ["a", "b"]
    loaded = {Path(path).name: dataset[i][0] for i, (path, _) in enumerate(dataset.samples)}
    assert all(image.mode == "RGB" for image in loaded.values())

    def pixel(name, xy=(5, 5)):
        return loaded[name].getpixel(xy)

    assert pixel("l.png") == (200, 200, 200)
    assert pixel("la.png") == (255, 255, 255)
    assert pixel("p.png") == (255, 0, 0)
    assert pixel("rgba.png") == (255, 255, 255)
    assert all(abs(a - b) <= 3 for a, b in zip(pixel("cmyk.jpg"), (255, 0, 0)))
    assert pixel("i16.png") == (255, 255, 255)
    assert pixel("f.tiff") == (128, 128, 128)
    rotated = loaded["rotated.jpg"]
    assert rotated.size == (20, 40)
    top, bottom = rotated.getpixel((10, 5)), rotated.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50

    assert load_image(root / "a" / "rgba.png", in_chans=1).mode == "L"
    assert ImageFolderDataset(root, in_chans=1)[0][0].mode == "L"


def _folder_with_bad_files(root: Path, good: int) -> None:
    for i in range(good):
        _save(Image.new("RGB", (8, 8), (i, i, i)), root / "cls" / f"good{i:03d}.png")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="JPEG")
    (root / "cls" / "good001_truncated.jpg").write_bytes(buffer.getvalue()[:300])
    (root / "cls" / "good002_noise.png").write_bytes(os.urandom(500))


def test_unreadable_files_are_skipped_named_and_counted(tmp_path, caplog):
    _folder_with_bad_files(tmp_path, good=4)
    dataset = ImageFolderDataset(tmp_path)
    names = [Path(path).name for path, _ in dataset.samples]
    truncated = names.index("good001_truncated.jpg")
    with caplog.at_level(logging.WARNING, logger="swinkit.data"):
        images = [dataset[i][0] for i in range(len(dataset))]
    assert "good001_truncated.jpg" in caplog.text and "good002_noise.png" in caplog.text
    assert dataset.num_failed == 2
    assert sorted(Path(p).name for p in dataset.failed_paths()) == ["good001_truncated.jpg", "good002_noise.png"]
    # the substitute is the next readable sample
    assert images[truncated].getpixel((0, 0)) == images[truncated + 1].getpixel((0, 0))
    assert dataset.check_failures(total=1000) == 2  # 0.2% is tolerated
    with pytest.raises(DataError, match="2 of 6 images.*could not be read"):
        dataset.check_failures()


def test_failures_in_dataloader_workers_reach_the_main_process(tmp_path):
    _folder_with_bad_files(tmp_path, good=6)
    dataset = ImageFolderDataset(tmp_path, transform=build_eval_transform(8, crop_pct=1.0))
    loader = DataLoader(dataset, batch_size=2, num_workers=2)
    assert sum(len(labels) for _, labels in loader) == len(dataset)
    assert dataset.num_failed == 2


def test_empty_class_folder_and_missing_paths_are_clear_errors(tmp_path):
    _save(Image.new("RGB", (8, 8)), tmp_path / "data" / "train" / "cat" / "1.png")
    (tmp_path / "data" / "train" / "dog").mkdir()
    with pytest.raises(DataError, match=r"train/dog holds no images"):
        ImageFolderDataset(tmp_path / "data" / "train")
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match="has no 'val' split \\(it has: train\\)"):
        resolve_split(tmp_path / "data", "val")
    assert resolve_split(tmp_path / "data", "train") == tmp_path / "data" / "train"
    # a class folder given directly serves any split
    assert resolve_split(tmp_path / "data" / "train", "val") == tmp_path / "data" / "train"
    with pytest.raises(DataError, match="does not exist"):
        resolve_split(tmp_path / "missing", "train")


# ---------------------------------------------------------------------------- synthetic


def test_synthetic_samples_are_deterministic_per_index():
    first, second = SyntheticDataset(10, 7, 16, seed=3), SyntheticDataset(10, 7, (16, 16), seed=3)
    image, label = first[4]
    assert image.shape == (3, 16, 16) and 0 <= label < 7
    assert torch.equal(image, second[4][0]) and label == second[4][1]
    assert not torch.equal(first[4][0], first[5][0])
    assert not torch.equal(first[4][0], SyntheticDataset(10, 7, 16, seed=4)[4][0])
    assert SyntheticDataset(2, 3, 8, in_chans=1)[0][0].shape == (1, 8, 8)
    with pytest.raises(IndexError):
        first[10]


# ---------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("in_chans", [1, 3])
def test_transforms_accept_grayscale_and_color_for_both_widths(in_chans):
    train = build_train_transform(32, in_chans=in_chans)
    plain = build_train_transform(32, in_chans=in_chans, augment=False)
    evaluate = build_eval_transform(32, in_chans=in_chans)
    for image in (Image.new("L", (40, 30), 90), Image.new("RGB", (30, 40), (10, 200, 30))):
        for transform in (train, plain, evaluate):
            out = transform(image)
            assert out.shape == (in_chans, 32, 32) and out.dtype == torch.float32


def test_eval_transform_resizes_by_crop_pct_then_center_crops():
    transform = build_eval_transform(224, mean=(0.0,) * 3, std=(1.0,) * 3)
    assert [type(step).__name__ for step in transform.transforms][:3] == ["RGB", "Resize", "CenterCrop"]
    assert transform.transforms[1].size == [256]
    image = Image.new("RGB", (300, 600), (255, 255, 255))
    assert transform(image).shape == (3, 224, 224)
    assert torch.allclose(transform(image), torch.ones(3, 224, 224))


def test_rand_augment_spec_parsing():
    assert parse_rand_augment("rand-m9-mstd0.5-inc1") == (2, 9)
    assert parse_rand_augment("rand-n3-m5") == (3, 5)
    with pytest.raises(ValueError):
        parse_rand_augment("auto-m9")


def test_mixup_cutmix_soft_targets_sum_to_one_and_replay_under_seed():
    mix = build_mixup_cutmix(num_classes=5)
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 5

    def run(seed):
        torch.manual_seed(seed)
        return [mix(images.clone(), labels) for _ in range(6)]

    first, again, other = run(0), run(0), run(1)
    for mixed, targets in first:
        assert targets.shape == (8, 5)
        assert torch.allclose(targets.sum(dim=1), torch.ones(8))
        assert targets.min() >= 0.1 / 5 - 1e-6  # label smoothing floor
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, other))

    smooth_only = build_mixup_cutmix(num_classes=5, prob=0.0)
    same, targets = smooth_only(images, labels)
    assert torch.equal(same, images)
    assert torch.allclose(targets[0], torch.tensor([0.92, 0.02, 0.02, 0.02, 0.02]))
