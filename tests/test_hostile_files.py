"""Hostile files: each gets one clear error that names it, in bounded memory and time, and runs no code.

Every hostile file is built here, in the test's own folder: checkpoints whose metadata asks for a huge
model or lies about its tensors, safetensors headers that name a tensor twice, shard indexes that point
outside their folder, Hugging Face configs of the wrong shape, images that are huge, 16-bit or absurdly
elongated, image folders with link loops, and YAML recipes that are alias bombs or nested without end.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

import swinkit
from swinkit.api import read_native
from swinkit.data import DataError, ImageFolderDataset, load_image, to_model_mode
from swinkit.data import datasets as datasets_module
from swinkit.infer import predict
from swinkit.metadata import Preprocess
from swinkit.train.config import ConfigError, load_config
from swinkit.weights.io import CheckpointError, read_checkpoint

MODEL = "swin_nano_patch2_window4_32"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def nano_file(tmp_path_factory) -> Path:
    """A genuine swinkit safetensors of the tiny test model (with config metadata)."""
    torch.manual_seed(0)
    return swinkit.save_weights(swinkit.create_model(MODEL), tmp_path_factory.mktemp("nano") / "nano.safetensors")


def with_config(source: Path, path: Path, drop: tuple[str, ...] = (), **changes) -> Path:
    """A copy of `source` whose `swinkit_config` metadata has `changes` (and lacks the tensors in `drop`)."""
    tensors = {k: v for k, v in load_file(source).items() if not k.startswith(drop or ("\0",))}
    metadata = read_checkpoint(source)[1]
    metadata["swinkit_config"] = json.dumps({**json.loads(metadata["swinkit_config"]), **changes})
    save_file(tensors, path, metadata=metadata)
    return path


def raw_safetensors(path: Path, header: str | bytes, data: bytes = b"") -> Path:
    """A file in the safetensors framing with a header written by hand."""
    header = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares `width` x `height` RGB pixels but holds (almost) no data: a few hundred bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def gray_png(path: Path, size=(24, 24), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8)).save(path)
    return path


# ----------------------------------------------------------------------------- class 2: metadata asks for too much
def test_metadata_embed_dim_beyond_limits_is_refused_before_building(nano_file, tmp_path):
    path = with_config(nano_file, tmp_path / "huge.safetensors", embed_dim=65536, num_heads=[1, 2, 4])
    with pytest.raises(CheckpointError, match=r"huge\.safetensors' has invalid swinkit_config.*embed_dim 65536"):
        swinkit.create_model(pretrained=path)


def test_metadata_that_does_not_match_the_tensors_is_refused(nano_file, tmp_path):
    path = with_config(nano_file, tmp_path / "liar.safetensors", embed_dim=64, num_heads=[2, 4, 8])
    with pytest.raises(CheckpointError, match=r"liar\.safetensors' has swinkit_config metadata that does not "
                                              r"match its tensors: 'patch_embed\.proj\.weight' is \[32, 3, 2, 2\]"):
        swinkit.create_model(pretrained=path)


def test_metadata_claiming_more_blocks_than_the_file_holds_is_refused(nano_file, tmp_path):
    path = with_config(nano_file, tmp_path / "deep.safetensors", depths=[2, 2, 100])
    with pytest.raises(CheckpointError, match=r"deep\.safetensors' .* it has no 'layers\.2\.blocks\.2\."):
        read_native(path)


def test_metadata_with_untyped_fields_is_refused(nano_file, tmp_path):
    path = with_config(nano_file, tmp_path / "typed.safetensors", embed_dim="abc")
    with pytest.raises(CheckpointError, match=r"typed\.safetensors' has invalid swinkit_config.*embed_dim.*'abc'"):
        read_native(path)
    tensors = load_file(nano_file)
    save_file(tensors, tmp_path / "list.safetensors", metadata={"swinkit_config": "[1, 2]"})
    with pytest.raises(CheckpointError, match=r"list\.safetensors' has invalid swinkit_config"):
        read_native(tmp_path / "list.safetensors")


def test_metadata_window_whose_buffers_would_not_fit_is_refused(nano_file, tmp_path):
    # v2 window buffers are not backed by any tensor in the file: 64^4 int64 per block is 134 MB.
    path = with_config(nano_file, tmp_path / "window.safetensors", version=2, window_size=64, img_size=4096,
                       depths=[8, 8, 8])
    with pytest.raises(CheckpointError, match=r"window\.safetensors' .*window_size 64 \(window buffers of"):
        read_native(path)


def test_metadata_head_without_weights_must_be_of_sane_size(nano_file, tmp_path):
    path = with_config(nano_file, tmp_path / "head.safetensors", drop=("head.",), num_classes=1_000_000)
    with pytest.raises(CheckpointError, match=r"head\.safetensors' .*no classifier for the metadata's 1000000"):
        read_native(path)


@pytest.mark.parametrize("stored, culprit", [
    ({"img_size": 100000}, "img_size 100000"),
    ({"img_size": [32, 32, 32]}, "img_size"),
    ({"img_size": True}, "img_size"),
    ({"crop_pct": 1e-9}, "resizes images to more than 8192"),
    ({"mean": "abc"}, "mean"),
    ({"std": [0, 0, 0]}, "std must not hold zeros"),
    ({"interpolation": "sinc-of-doom"}, "interpolation"),
])
def test_preprocess_metadata_is_bounded_and_typed(stored, culprit):
    metadata = {"swinkit_preprocess": json.dumps(stored)}
    with pytest.raises(CheckpointError, match=r"'w\.safetensors' has invalid swinkit_preprocess.*" + culprit):
        Preprocess.from_metadata(metadata, source="w.safetensors")


# ----------------------------------------------------------------------------- class 3: lying safetensors headers
DUPLICATE = ('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
             '"w": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}}')


def test_duplicate_tensor_name_is_refused(tmp_path):
    path = raw_safetensors(tmp_path / "twice.safetensors", DUPLICATE, bytes(8))
    assert load_file(path)["w"].shape == (4,)  # the library itself silently keeps the second entry
    with pytest.raises(CheckpointError, match=r"twice\.safetensors' names 'w' twice"):
        read_checkpoint(path)


@pytest.mark.parametrize("header, data, culprit", [
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
     '"b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', bytes(8), "tensors 'a' and 'b' share bytes"),
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}}', bytes(8), "outside the file's 8 data bytes"),
    ('{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}', bytes(8), "needs 12 bytes"),
    ('{"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}', bytes(8), "invalid shape"),
    ('{"__metadata__": {"swinkit_config": 5}}', b"", "metadata is not a map of strings"),
    ('[1, 2, 3]', b"", "not a JSON object"),
    ('{"a": ' * 100_000 + '1' + '}' * 100_000, b"", "not valid JSON"),
    ('{"__metadata__": {"k": "v", "k": "w"}}', b"", "names 'k' twice"),
])
def test_corrupt_safetensors_headers_are_refused(tmp_path, header, data, culprit):
    path = raw_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors' .*" + culprit):
        read_checkpoint(path)


def test_header_length_beyond_the_file_is_refused_without_allocating(tmp_path):
    path = tmp_path / "long.safetensors"
    path.write_bytes(struct.pack("<Q", 2 ** 62) + b'{"a": 1}')
    with pytest.raises(CheckpointError, match=r"long\.safetensors' is truncated or corrupt"):
        read_checkpoint(path)


# ----------------------------------------------------------------------------- class 3: shard indexes
def write_index(folder: Path, shard_name: str, kind: str = "safetensors") -> Path:
    index = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"weight_map": {"a": shard_name}}))
    return folder / index


@pytest.mark.parametrize("name", ["../outside.safetensors", "sub/../../outside.safetensors", "ABSOLUTE"])
def test_shard_index_naming_a_file_outside_its_folder_is_refused(tmp_path, name):
    outside = tmp_path / "outside.safetensors"
    save_file({"a": torch.zeros(2)}, outside)
    folder = tmp_path / "hf"
    (folder / "sub").mkdir(parents=True)
    name = str(outside) if name == "ABSOLUTE" else name
    write_index(folder, name)
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json' names shard .*outside the folder"):
        read_checkpoint(folder)


def test_shard_index_naming_a_link_out_of_its_folder_is_refused(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "secret.safetensors")
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "shard.safetensors").symlink_to(tmp_path / "secret.safetensors")
    write_index(folder, "shard.safetensors")
    with pytest.raises(CheckpointError, match=r"names shard 'shard\.safetensors', a link to .*secret\.safetensors"):
        read_checkpoint(folder)


def test_hub_cache_snapshot_links_to_its_blobs_are_read(tmp_path):
    """The Hugging Face hub cache links snapshots/<revision>/<file> to ../../blobs/<hash>: that is allowed."""
    repo = tmp_path / "models--someone--swin"
    (repo / "blobs").mkdir(parents=True)
    save_file({"a": torch.ones(2)}, repo / "blobs" / "0123abcd")
    snapshot = repo / "snapshots" / "main"
    snapshot.mkdir(parents=True)
    (snapshot / "model-00001-of-00001.safetensors").symlink_to("../../blobs/0123abcd")
    write_index(snapshot, "model-00001-of-00001.safetensors")
    assert torch.equal(read_checkpoint(snapshot)[0]["a"], torch.ones(2))


class _Payload:
    """Pickles as a call that would create a marker file if anything executed it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_shards_run_no_code_inside_or_outside_the_folder(tmp_path):
    marker = tmp_path / "PWNED"
    (tmp_path / "evil.bin").write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    folder = tmp_path / "hf"
    folder.mkdir()
    write_index(folder, "../evil.bin", kind="bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin\.index\.json' names shard '\.\./evil\.bin'"):
        read_checkpoint(folder)
    torch.save({"a": torch.zeros(2), "x": _Payload(marker)}, folder / "shard.bin")
    write_index(folder, "shard.bin", kind="bin")
    with pytest.raises(CheckpointError, match=r"shard\.bin' contains objects other than tensors"):
        read_checkpoint(folder)
    assert not marker.exists()


def test_shard_index_of_the_wrong_shape_is_refused(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a.safetensors"]}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json' is not a valid shard index"):
        read_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- class 1: Hugging Face config.json
@pytest.mark.parametrize("text, culprit", [
    ("[1, 2]", "holds a JSON list, expected an object"),
    ('{"window_size": "abc"}', "has window_size 'abc'"),
    ('{"window_size": true}', "has window_size True"),
    ('{"image_size": [1, 2, 3]}', r"has image_size \[1, 2, 3\]"),
    ("{", "is not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "is not valid JSON"),
])
def test_hf_config_that_is_not_an_object_or_has_wrong_types_is_refused(tmp_path, text, culprit):
    save_file({"a": torch.zeros(2)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"config\.json' " + culprit):
        read_checkpoint(tmp_path)


def test_hf_image_size_beyond_limits_is_refused(tmp_path):
    model = swinkit.create_model(MODEL)
    folder = swinkit.save_weights(model, tmp_path / "hf", layout="hf")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "image_size": 100_000}))
    with pytest.raises(CheckpointError, match=r"hf' describes a model swinkit cannot build: .*img_size"):
        swinkit.create_model(pretrained=folder)


def test_hf_config_smuggled_into_safetensors_metadata_is_checked(tmp_path):
    model = swinkit.create_model(MODEL)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "timm.safetensors",
              metadata={"hf_config": "[1, 2]"})
    with pytest.raises(CheckpointError, match=r"timm\.safetensors' holds a JSON list"):
        read_native(tmp_path / "timm.safetensors")


# ----------------------------------------------------------------------------- class 2: images
def test_image_declaring_too_many_pixels_is_refused_before_decoding(tmp_path):
    for width in (12_000, 60_000):  # above swinkit's cap; and above PIL's own bomb limit
        path = png_header(tmp_path / f"bomb{width}.png", width, width)
        start = time.perf_counter()
        with pytest.raises(DataError, match=rf"image .*bomb{width}\.png .*100,000,000"):
            load_image(path)
        assert time.perf_counter() - start < 2


def test_extremely_elongated_image_is_refused(tmp_path):
    path = gray_png(tmp_path / "strip.png", size=(500, 2))
    with pytest.raises(DataError, match=r"image .*strip\.png is 500x2, more elongated than the 1:100"):
        load_image(path)


def test_sixteen_bit_and_float_images_convert_exactly(tmp_path):
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 65536, (40, 70), dtype=np.uint16)
    wide[0, :5] = [0, 128, 129, 385, 65535]
    Image.fromarray(wide).save(tmp_path / "wide.png")
    image = load_image(tmp_path / "wide.png", in_chans=1)
    assert np.array_equal(np.asarray(image), np.round(wide / 257.0).astype(np.uint8))
    floats = rng.random((30, 20)).astype(np.float32)
    floats[0, 0] = np.nan
    expected = np.nan_to_num(floats.astype(np.float64) * 255.0).round().clip(0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(to_model_mode(Image.fromarray(floats), in_chans=1)), expected)


def test_huge_jpeg_is_decoded_at_the_size_the_caller_needs(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (5000, 4000), (200, 30, 90)).save(path, quality=50)
    small = load_image(path, min_side=256)
    assert 256 <= min(small.size) <= 1000 and small.size[0] > small.size[1]
    assert np.abs(np.asarray(small, dtype=np.int16) - (200, 30, 90)).max() <= 8
    assert load_image(gray_png(tmp_path / "photo.png", (300, 200)), min_side=32).size == (300, 200)  # small: as is


def test_image_folder_skips_and_reports_huge_and_undecodable_images(tmp_path, monkeypatch):
    (tmp_path / "cat").mkdir()
    for index in range(8):
        gray_png(tmp_path / "cat" / f"{index}.png", seed=index)
    png_header(tmp_path / "cat" / "bomb.png", 50_000, 50_000)
    gray_png(tmp_path / "cat" / "strip.png", size=(1000, 3))
    gray_png(tmp_path / "cat" / "oom.png")
    real_load = datasets_module.load_image

    def load(path, *args, **kwargs):
        if Path(path).name == "oom.png":
            raise MemoryError("decoding oom.png")
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(datasets_module, "load_image", load)
    dataset = ImageFolderDataset(tmp_path)
    images = [dataset[index][0] for index in range(len(dataset))]
    assert all(image.size == (24, 24) for image in images)
    assert sorted(Path(p).name for p in dataset.failed_paths()) == ["bomb.png", "oom.png", "strip.png"]
    with pytest.raises(DataError, match=r"3 of 11 images under .* could not be read.*bomb\.png"):
        dataset.check_failures()


def test_predict_reports_a_huge_image_by_name(nano_file, tmp_path):
    good = gray_png(tmp_path / "good.png")
    bomb = png_header(tmp_path / "bomb.png", 20_000, 20_000)
    results = predict(nano_file, [bomb, good], topk=1, device="cpu")
    assert "bomb.png" in results[0]["error"] and "pixels" in results[0]["error"]
    assert "predictions" in results[1]


# ----------------------------------------------------------------------------- class 8: link loops
def test_image_folder_with_a_link_loop_is_refused(tmp_path):
    (tmp_path / "cat").mkdir()
    gray_png(tmp_path / "cat" / "a.png")
    (tmp_path / "cat" / "again").symlink_to(tmp_path / "cat")
    with pytest.raises(DataError, match=r"has a link loop: .*cat/again leads back to .*cat"):
        ImageFolderDataset(tmp_path)


def test_image_folder_linking_to_its_root_is_refused(tmp_path):
    (tmp_path / "dog").mkdir()
    gray_png(tmp_path / "dog" / "a.png")
    (tmp_path / "dog" / "up").symlink_to("..")
    with pytest.raises(DataError, match=r"link loop: .*dog/up leads back to"):
        ImageFolderDataset(tmp_path)


def test_folder_reached_twice_through_links_counts_once(tmp_path):
    (tmp_path / "data" / "cat" / "real").mkdir(parents=True)
    gray_png(tmp_path / "data" / "cat" / "real" / "a.png")
    (tmp_path / "data" / "cat" / "alias").symlink_to("real")
    (tmp_path / "elsewhere").mkdir()
    gray_png(tmp_path / "elsewhere" / "b.png")
    (tmp_path / "data" / "dog").symlink_to(tmp_path / "elsewhere")  # an ordinary linked class folder
    dataset = ImageFolderDataset(tmp_path / "data")
    assert [(Path(path).name, target) for path, target in dataset.samples] == [("a.png", 0), ("b.png", 1)]


def test_image_order_is_torchvision_order(tmp_path):
    for name in ["b/z/1.png", "b/a.png", "b/y/2.jpg", "b/y-x/3.png", "a/9.png", "a/sub/0.png", "a/notes.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        gray_png(tmp_path / name) if not name.endswith(".txt") else (tmp_path / name).write_text("x")
    dataset = ImageFolderDataset(tmp_path)
    assert dataset.samples == make_dataset(str(tmp_path), dataset.class_to_idx, extensions=IMG_EXTENSIONS)


# ----------------------------------------------------------------------------- class 4 and 1: recipes
BOMB = "".join(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9) if prev else ', '.join(['x'] * 9)}]\n"
               for prev, name in zip([None, *"abcdefgh"], "abcdefghi"))


@pytest.mark.parametrize("text, culprit", [
    (BOMB, "expands to more than 100000 values"),
    ("model: " + "[" * 20_000 + "]" * 20_000 + "\n", "nested more than 32 levels deep"),
    ("".join("  " * depth + f"k{depth}:\n" for depth in range(100)), "nested more than 32 levels deep"),
    ("model: &a [*a]\n", "nested more than 32 levels deep"),
    ("model:\n  arch:\n    embed_dim: abc\n", "config key 'model.arch.embed_dim' must be int, got 'abc'"),
    ("model:\n  name: null\n  arch:\n    depths: [2, two]\n", r"'model\.arch\.depths\[1\]' must be int"),
])
def test_hostile_recipes_give_one_config_error_quickly(tmp_path, text, culprit):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"config file '.*recipe\.yaml'.*" + culprit):
        load_config(path, ["data.synthetic=true"])
    assert time.perf_counter() - start < 5


def test_recipe_too_large_or_not_text_is_refused(tmp_path):
    (tmp_path / "big.yaml").write_text("# padding\n" * 200_000)
    with pytest.raises(ConfigError, match=r"config file '.*big\.yaml' is 2000000 bytes"):
        load_config(tmp_path / "big.yaml")
    (tmp_path / "binary.yaml").write_bytes(b"model: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"config file '.*binary\.yaml' is not UTF-8"):
        load_config(tmp_path / "binary.yaml")


def test_recipe_anchors_and_merge_keys_still_work(tmp_path):
    (tmp_path / "ok.yaml").write_text("optim:\n  betas: &pair [0.8, 0.9]\n  <<: {lr: 2e-4}\n"
                                      "augment:\n  scale: *pair\n")
    config = load_config(tmp_path / "ok.yaml", ["data.synthetic=true"])
    assert (config.optim.lr, config.optim.betas, config.augment.scale) == (2e-4, [0.8, 0.9], [0.8, 0.9])


@pytest.mark.parametrize("override", ["model.arch.embed_dim=abc", "model.arch.qkv_bias=3"])
def test_untyped_arch_override_names_its_key(override):
    with pytest.raises(ConfigError, match=rf"config key '{override.split('=')[0]}' must be"):
        load_config(None, ["data.synthetic=true", override])


# ----------------------------------------------------------------------------- the command line
def test_command_line_gives_one_line_and_status_2(nano_file, tmp_path):
    image = gray_png(tmp_path / "img.png")
    twice = raw_safetensors(tmp_path / "twice.safetensors", DUPLICATE, bytes(8))
    huge = with_config(nano_file, tmp_path / "huge.safetensors", embed_dim=65536, num_heads=[1, 2, 4])
    (tmp_path / "bomb.yaml").write_text(BOMB)
    commands = {
        "twice.safetensors": ["predict", "--weights", str(twice), "--model", MODEL, str(image)],
        "huge.safetensors": ["predict", "--weights", str(huge), str(image)],
        "bomb.yaml": ["train", "--config", str(tmp_path / "bomb.yaml"), "--synthetic"],
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    running = {culprit: subprocess.Popen([sys.executable, "-m", "swinkit.cli", *argv], cwd=tmp_path, env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for culprit, argv in commands.items()}
    for culprit, process in running.items():
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 2, (culprit, stderr)
        assert "Traceback" not in stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and culprit in lines[0], (culprit, stderr)
    assert not (tmp_path / "runs").exists()  # nothing was started, so nothing was written


# ----------------------------------------------------------------------------- bounded memory
MEMORY_CHECK = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    import swinkit
    from swinkit.infer import predict
    from swinkit.train.config import ConfigError, load_config
    from swinkit.weights.io import CheckpointError

    folder = Path(sys.argv[1])
    # Address space in use after the imports (torch maps gigabytes it never touches), plus 768 MiB.
    in_use = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (in_use + (768 << 20), resource.RLIM_INFINITY))
    try:
        swinkit.create_model(pretrained=folder / "huge.safetensors")
        print("huge-metadata built a model")
    except CheckpointError:
        print("huge-metadata refused")
    result = predict(folder / "nano.safetensors", [folder / "wide.png"], topk=1, device="cpu")[0]
    print("wide-png", result.get("error", "decoded"))
    try:
        load_config(folder / "bomb.yaml")
    except ConfigError:
        print("bomb-yaml refused")
""")


def test_hostile_inputs_stay_within_a_memory_limit(nano_file, tmp_path):
    """A 768 MiB budget: the old code spent tens of GB on the metadata, ~900 MB on the 16-bit
    6000 x 6000 image (float64 copies; ~300 MB now), and hung on the alias bomb."""
    with_config(nano_file, tmp_path / "huge.safetensors", embed_dim=65536, num_heads=[1, 2, 4])
    (tmp_path / "nano.safetensors").write_bytes(nano_file.read_bytes())
    wide = np.zeros((6000, 6000), dtype=np.uint16)
    wide[::7] = 40000
    Image.fromarray(wide).save(tmp_path / "wide.png", compress_level=1)
    del wide
    (tmp_path / "bomb.yaml").write_text(BOMB)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", MEMORY_CHECK, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:3] == ["huge-metadata refused", "wide-png decoded", "bomb-yaml refused"], \
        done.stdout + done.stderr[-3000:]
