"""Checkpoint file I/O: every supported form reads back, every bad file gets one clear error."""
from __future__ import annotations

import json
import os
import pickle
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file

from swinkit.files import atomic_write, torch_save_atomic
from swinkit.weights.io import CheckpointError, read_checkpoint, write_safetensors


@pytest.fixture
def state_dict():
    torch.manual_seed(0)
    return OrderedDict([
        ("patch_embed.proj.weight", torch.randn(8, 3, 4, 4)),
        ("layers.0.blocks.0.attn.relative_position_index", torch.arange(9).view(3, 3)),
        ("head.weight", torch.randn(10, 8)),
        ("head.bias", torch.zeros(10, dtype=torch.float16)),
    ])


def assert_same(actual, expected):
    assert sorted(actual) == sorted(expected)  # safetensors stores keys in its own order
    for key in expected:
        assert actual[key].dtype == expected[key].dtype
        assert torch.equal(actual[key], expected[key]), key


def test_safetensors_round_trip_keeps_metadata(tmp_path, state_dict):
    path = write_safetensors(state_dict, tmp_path / "w.safetensors", {"swinkit_config": '{"depths": [2]}'})
    loaded, metadata = read_checkpoint(path)
    assert_same(loaded, state_dict)
    assert metadata == {"swinkit_config": '{"depths": [2]}'}


def test_safetensors_copies_tied_weights(tmp_path, state_dict):
    state_dict["head_tied.weight"] = state_dict["head.weight"]
    loaded, _ = read_checkpoint(write_safetensors(state_dict, tmp_path / "tied.safetensors"))
    assert_same(loaded, state_dict)


def test_official_model_container_pth(tmp_path, state_dict):
    torch.save({"model": state_dict}, tmp_path / "swin_tiny_patch4_window7_224.pth")
    loaded, metadata = read_checkpoint(tmp_path / "swin_tiny_patch4_window7_224.pth")
    assert_same(loaded, state_dict)
    assert metadata == {}


@pytest.mark.parametrize("container", ["state_dict", "module"])
def test_other_containers_unwrap(tmp_path, state_dict, container):
    torch.save({container: state_dict, "epoch": 3}, tmp_path / "ckpt.pt")
    assert_same(read_checkpoint(tmp_path / "ckpt.pt")[0], state_dict)


def test_ema_only_used_when_nothing_else(tmp_path, state_dict):
    ema = {key: value + 1 if value.is_floating_point() else value for key, value in state_dict.items()}
    torch.save({"model": state_dict, "model_ema": ema}, tmp_path / "both.pth")
    torch.save({"model_ema": ema, "epoch": 1}, tmp_path / "ema.pth")
    assert_same(read_checkpoint(tmp_path / "both.pth")[0], state_dict)
    assert_same(read_checkpoint(tmp_path / "ema.pth")[0], ema)


def test_timm_training_checkpoint_with_args_namespace(tmp_path, state_dict):
    import argparse
    torch.save({"state_dict": state_dict, "args": argparse.Namespace(lr=0.1)}, tmp_path / "model_best.pth.tar")
    assert_same(read_checkpoint(tmp_path / "model_best.pth.tar")[0], state_dict)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_wrapper_prefixes_are_stripped(tmp_path, state_dict, prefix):
    torch.save({"model": {prefix + key: value for key, value in state_dict.items()}}, tmp_path / "ddp.pth")
    assert_same(read_checkpoint(tmp_path / "ddp.pth")[0], state_dict)


def test_prefix_on_some_keys_only_is_kept(tmp_path, state_dict):
    state_dict["module.extra"] = torch.ones(1)
    torch.save(state_dict, tmp_path / "mixed.pth")
    assert "module.extra" in read_checkpoint(tmp_path / "mixed.pth")[0]


def test_plain_bin_file(tmp_path, state_dict):
    torch.save(state_dict, tmp_path / "weights.bin", _use_new_zipfile_serialization=False)
    assert_same(read_checkpoint(tmp_path / "weights.bin")[0], state_dict)


HF_CONFIG = {"model_type": "swin", "embed_dim": 8, "depths": [2], "num_labels": 10}


def test_hf_folder_single_safetensors(tmp_path, state_dict):
    hf = {"swin." + key: value for key, value in state_dict.items()}
    save_file(dict(hf), tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    loaded, metadata = read_checkpoint(tmp_path)
    assert_same(loaded, hf)
    assert json.loads(metadata["hf_config"]) == HF_CONFIG
    assert metadata["format"] == "pt"
    # The weights file picked out of the folder still finds its config.
    assert json.loads(read_checkpoint(tmp_path / "model.safetensors")[1]["hf_config"]) == HF_CONFIG


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_hf_folder_sharded(tmp_path, state_dict, kind):
    keys = list(state_dict)
    shards = {f"model-0000{i + 1}-of-00002.{kind}": {k: state_dict[k] for k in part}
              for i, part in enumerate([keys[:2], keys[2:]])}
    for name, shard in shards.items():
        save_file(shard, tmp_path / name) if kind == "safetensors" else torch.save(shard, tmp_path / name)
    weight_map = {key: name for name, shard in shards.items() for key in shard}
    index = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    (tmp_path / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    loaded, metadata = read_checkpoint(tmp_path)
    assert_same(loaded, state_dict)
    assert json.loads(metadata["hf_config"]) == HF_CONFIG


def test_hf_shard_index_naming_missing_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        read_checkpoint(tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"'.*nope\.pth' does not exist"):
        read_checkpoint(tmp_path / "nope.pth")


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="folder with no weights"):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize("name", ["empty.pth", "empty.safetensors"])
def test_empty_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"'.*{name}' is empty"):
        read_checkpoint(tmp_path / name)


@pytest.mark.parametrize("name", ["w.pth", "w.safetensors"])
def test_truncated_file(tmp_path, state_dict, name):
    full = tmp_path / ("full" + name)
    write_safetensors(state_dict, full) if name.endswith(".safetensors") else torch.save({"model": state_dict}, full)
    data = full.read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match=rf"'.*{name}' is truncated or corrupt"):
        read_checkpoint(tmp_path / name)


@pytest.mark.parametrize("name", ["random.pth", "random.bin", "random.safetensors"])
def test_random_bytes(tmp_path, name):
    (tmp_path / name).write_bytes(bytes(range(7, 256)) * 8)
    with pytest.raises(CheckpointError, match=rf"'.*{name}' is"):
        read_checkpoint(tmp_path / name)


class _Payload:
    """Pickles as a call that would create a marker file if anything executed it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_without_running_code(tmp_path, state_dict):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    torch.save({"model": state_dict, "extra": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"'.*evil\.pth' contains objects other than tensors"):
        read_checkpoint(path)
    assert not marker.exists()


def test_malicious_raw_pickle_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    with pytest.raises(CheckpointError, match=r"'.*evil\.bin' contains objects other than tensors"):
        read_checkpoint(path)
    assert not marker.exists()


def test_payload_that_is_not_a_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match=r"'.*list\.pth' holds a list, not a dict of tensors"):
        read_checkpoint(tmp_path / "list.pth")


def test_dict_without_tensors(tmp_path):
    torch.save({"epoch": 3, "model": {}}, tmp_path / "notensors.pth")
    with pytest.raises(CheckpointError, match=r"'.*notensors\.pth' holds a dict with no tensors"):
        read_checkpoint(tmp_path / "notensors.pth")


def test_state_dict_with_non_tensor_entry(tmp_path):
    torch.save({"a": torch.zeros(1), "b": [1, 2]}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"'.*odd\.pth' has entry 'b' of type list"):
        read_checkpoint(tmp_path / "odd.pth")


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path, state_dict):
    path = write_safetensors(state_dict, tmp_path / "w.safetensors")
    before = path.read_bytes()

    def fails_half_way(tmp):
        tmp.write_bytes(b"half a checkpoint")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fails_half_way)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["w.safetensors"]  # no temp file left behind


def test_atomic_write_replaces_and_creates_folders(tmp_path, state_dict):
    path = torch_save_atomic({"model": state_dict}, tmp_path / "run" / "last.pth")
    assert_same(read_checkpoint(path)[0], state_dict)
    torch_save_atomic({"model": {"x": torch.ones(1)}}, path)
    assert list(read_checkpoint(path)[0]) == ["x"]
    assert os.listdir(path.parent) == ["last.pth"]
