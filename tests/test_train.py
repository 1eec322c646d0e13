"""swinkit.train: config, exact resume after SIGKILL, DDP == single process, outputs, bad data, AMP."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import swinkit
from swinkit.data import DataError
from swinkit.train import ConfigError, load_config, train
from swinkit.train.data import GlobalBatchSampler, SeededTransformDataset, crop_flip_batch

SRC = Path(__file__).resolve().parents[1] / "src"
NANO = "swin_nano_patch2_window4_32"
# A tiny synthetic run: 48 images, batch 4 -> 12 steps per epoch.
_SYNTHETIC_KEYS = {"data.synthetic_train_size": 48, "data.synthetic_val_size": 16, "schedule.warmup_epochs": 0,
                   "optim.scale_lr": "false", "optim.lr": "1e-3", "output.tensorboard": "false",
                   "output.curves": "false", "train.log_every": 4}


def synthetic(*flags, **keys) -> list:
    """CLI args for a nano model on synthetic data; `keys` (dots as '__') override `_SYNTHETIC_KEYS`."""
    values = {**_SYNTHETIC_KEYS, **{k.replace("__", "."): v for k, v in keys.items()}}
    return ["--synthetic", "--model", NANO, "--workers", "0", *flags, *(f"{k}={v}" for k, v in values.items())]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1", CI="1")
    env.pop("WORLD_SIZE", None)
    env.pop("LOCAL_RANK", None)
    return env


def swinkit_train(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "swinkit", "train", *map(str, args)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def finish(process: subprocess.Popen, timeout: float = 120) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


def assert_same_tensors(a: Path, b: Path, atol: float | None = None) -> None:
    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys()
    for key in first:
        if atol is None:
            assert torch.equal(first[key], second[key]), key
        else:
            torch.testing.assert_close(first[key], second[key], atol=atol, rtol=0, msg=key)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def image_folder(root: Path, per_class: dict[str, int], size: int = 32, corrupt: int = 0) -> Path:
    rng = np.random.default_rng(0)
    for class_index, (name, count) in enumerate(per_class.items()):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            pixels[..., class_index % 3] = 255 - 40 * class_index  # a learnable colour cue
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    for i in range(corrupt):
        good = (root / next(iter(per_class)) / "000.png").read_bytes()
        (root / next(iter(per_class)) / f"corrupt_{i}.png").write_bytes(good[: len(good) // 3])  # truncated
    return root


def run_config(tmp_path: Path, *overrides: str, synthetic: bool = True):
    base = ["model.name=" + NANO, "data.workers=0", "schedule.warmup_epochs=0", "train.batch_size=4",
            f"output.dir={tmp_path / 'run'}", "output.tensorboard=false", "output.curves=false"]
    if synthetic:
        base += ["data.synthetic=true", "data.synthetic_train_size=16", "data.synthetic_val_size=8"]
    return load_config(None, base + list(overrides))


# ----------------------------------------------------------------------------------------- config
def test_config_overrides_are_type_checked_and_unknown_keys_named(tmp_path):
    config = load_config(None, ["data.synthetic=true", "optim.lr=1e-3", "model.arch.embed_dim=64",
                                "augment.scale=[0.5, 1]", "optim.clip_grad=null"], {"train.batch_size": 7})
    assert config.optim.lr == 1e-3 and config.train.batch_size == 7 and config.model.arch == {"embed_dim": 64}
    assert config.augment.scale == [0.5, 1.0] and config.optim.clip_grad is None
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'.*optim.lr"):
        load_config(None, ["data.synthetic=true", "optim.lrr=1"])
    with pytest.raises(ConfigError, match="unknown config key 'trainer.epochs'"):
        load_config(None, ["data.synthetic=true", "trainer.epochs=1"])
    with pytest.raises(ConfigError, match="'train.batch_size' must be int, got 'big'"):
        load_config(None, ["data.synthetic=true", "train.batch_size=big"])
    with pytest.raises(ConfigError, match="'train.precision' must be one of"):
        load_config(None, ["data.synthetic=true", "train.precision=fp8"])
    with pytest.raises(ConfigError, match="unknown config key 'model.arch.embed_dims'"):
        load_config(None, ["data.synthetic=true", "model.arch.embed_dims=64"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["data.synthetic"])
    with pytest.raises(ConfigError, match="no training data"):
        load_config(None, [])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("optim:\n  lr: 5e-4\n  warmup: 3\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml.*'optim.warmup'"):
        load_config(recipe, ["data.synthetic=true"])
    recipe.write_text("optim:\n  lr: 5e-4\ndata:\n  synthetic: true\n")
    assert load_config(recipe, ["optim.lr=2e-4"]).optim.lr == 2e-4  # key=value beats the file


def test_every_recipe_in_configs_loads():
    recipes = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(recipes) >= 10
    for recipe in recipes:
        config = load_config(recipe, ["data.synthetic=true"])
        if config.model.name:
            swinkit.get_config(config.model.name)


# ------------------------------------------------------------------------------------ data order
def test_two_ranks_of_batch_b_see_one_rank_of_batch_2b():
    single = GlobalBatchSampler(40, 8, world_size=1, rank=0, seed=3)
    ranks = [GlobalBatchSampler(40, 4, world_size=2, rank=r, seed=3) for r in range(2)]
    for sampler in (single, *ranks):
        sampler.set_position(epoch=2, step=1)
    for whole, first, second in zip(single, *ranks):
        assert whole == first + second
    assert len(single) == 4  # 40 // 8 = 5 steps, resumed at 1


def test_augmentation_depends_on_seed_epoch_index_not_on_workers():
    from swinkit.data import build_train_transform

    base = [(Image.fromarray(np.full((40, 40, 3), 30 * i, np.uint8)), i) for i in range(6)]
    transform = build_train_transform(32, random_erasing=0.5)
    dataset = SeededTransformDataset(base, transform, seed=1)
    keys = [(0, 2), (1, 2), (0, 5)]
    first = [dataset[k][0] for k in keys]
    torch.rand(100)  # the global RNG must not matter
    assert all(torch.equal(a, dataset[k][0]) for a, k in zip(first, keys))
    assert not torch.equal(first[0], first[1])  # another epoch, another crop
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=[keys], num_workers=2)
    assert torch.equal(next(iter(loader))[0], torch.stack(first))
    images = torch.randint(0, 255, (3, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(crop_flip_batch(images, keys, 0, 2, 0.5), crop_flip_batch(images, keys, 0, 2, 0.5))


# ----------------------------------------------------------------------------------- exact resume
def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path):
    # Augmentation (mixup/cutmix) and drop path on: the restored RNG must replay them.
    args = synthetic("--batch-size", 4, "--epochs", 3, "--save-every", 2, "--drop-path", 0.1, "--seed", 7)
    reference = tmp_path / "reference"
    finish(swinkit_train("--output", reference, *args))

    killed = tmp_path / "killed"
    process = swinkit_train("--output", killed, *args)
    deadline = time.monotonic() + 120
    while not (killed / "last.ckpt").exists():
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.3)  # land somewhere inside a later step
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    interrupted_at = torch.load(killed / "last.ckpt", weights_only=True)["position"]["global_step"]
    assert interrupted_at < 36

    finish(swinkit_train("--output", killed, "--resume", *args))
    assert_same_tensors(reference / "last.safetensors", killed / "last.safetensors")
    assert_same_tensors(reference / "best.safetensors", killed / "best.safetensors")
    losses = [[(r["step"], r.get("loss"), r.get("val_top1")) for r in map(json.loads, (run / "metrics.jsonl").open())]
              for run in (reference, killed)]
    assert losses[0] == losses[1]


# ------------------------------------------------------------------------------------ distributed
@pytest.mark.parametrize("recompute", [[], ["--grad-checkpointing"]], ids=["plain", "recompute"])
def test_ddp_two_processes_match_one_process_with_double_batch(tmp_path, recompute):
    # The recipe's lr (5e-4 per 512 images): Adam turns float noise in near-zero gradients into
    # steps of up to lr, so a large unscaled lr would compare noise, not the data split.
    # With recomputation the block parameters' gradients come out of train/lean/recompute.py's
    # autograd function once per step, which DDP's gradient hooks must see as usual.
    flags = ["--no-augment", "--drop-path", 0, "--max-steps", 4, *recompute]
    args = synthetic(*flags, data__synthetic_train_size=64, optim__scale_lr="true", optim__lr="5e-4")
    torchrun = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "swinkit",
         "train", "--batch-size", "4", "--output", str(tmp_path / "ddp"), *map(str, args)],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    single = swinkit_train("--batch-size", 8, "--output", tmp_path / "single", *args)
    finish(single)
    finish(torchrun)
    assert_same_tensors(tmp_path / "ddp" / "last.safetensors", tmp_path / "single" / "last.safetensors", atol=1e-5)
    ddp_eval = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").open()][-1]
    assert ddp_eval["val_images"] == 16  # distributed evaluation counts every image once


@pytest.mark.parametrize("recompute", [[], ["--grad-checkpointing"]], ids=["plain", "recompute"])
def test_fsdp_on_two_cpu_processes_matches_one_process(tmp_path, recompute):
    """`--nproc 2` relaunches under torchrun; FSDP2 (fully_shard) shards over gloo."""
    args = synthetic("--no-augment", "--drop-path", 0, "--max-steps", 3, *recompute, train__strategy="fsdp",
                     data__synthetic_train_size=32, optim__scale_lr="true", optim__lr="5e-4")
    fsdp = swinkit_train("--batch-size", 4, "--nproc", 2, "--output", tmp_path / "fsdp", *args)
    single = swinkit_train("--batch-size", 8, "--output", tmp_path / "single", *args)
    finish(single)
    finish(fsdp)
    assert_same_tensors(tmp_path / "fsdp" / "last.safetensors", tmp_path / "single" / "last.safetensors", atol=1e-5)
    assert torch.load(tmp_path / "fsdp" / "last.ckpt", weights_only=True)["world_size"] == 2


# ------------------------------------------------------------------------------ outputs and data
def test_output_folder_holds_everything_and_weights_load_alone(tmp_path):
    data = tmp_path / "data"
    image_folder(data / "train", {"cat": 8, "dog": 8, "fox": 8})
    image_folder(data / "val", {"cat": 3, "dog": 3, "fox": 3})
    config = run_config(tmp_path, f"data.path={data}", "schedule.epochs=2", "train.save_every=3",
                        "output.tensorboard=true", "output.curves=true", "train.ema=true", "train.log_every=2",
                        "augment.rand_augment=rand-m5-n1", synthetic=False)
    result = train(config)
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "last.ckpt", "last.safetensors", "best.safetensors", "curves.png"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert {"step", "epoch", "loss", "lr", "img_per_s"} <= set(records[0])
    epochs = [r for r in records if "val_top1" in r]
    assert [r["epoch"] for r in epochs] == [1, 2] and {"val_top5", "ema_val_top1"} <= set(epochs[0])
    assert result["steps"] == 12
    resolved = load_config(run / "config.yaml")
    assert resolved.model.num_classes == 3 and resolved.model.in_chans == 3
    for name in ("last.safetensors", "best.safetensors"):
        model = swinkit.create_model(pretrained=run / name)
        assert model.num_classes == 3
        with safe_open(str(run / name), "pt") as f:
            metadata = f.metadata()
        assert json.loads(metadata["swinkit_classes"]) == ["cat", "dog", "fox"]
        preprocess = json.loads(metadata["swinkit_preprocess"])
        assert preprocess["img_size"] == [32, 32] and preprocess["in_chans"] == 3 and len(preprocess["mean"]) == 3
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(config)  # no --resume: nothing is overwritten


def test_unreadable_image_is_skipped_and_reported(tmp_path, caplog):
    data = tmp_path / "data"
    image_folder(data / "train", {"a": 60, "b": 60}, corrupt=1)  # 1 of 121: under 1%
    image_folder(data / "val", {"a": 4, "b": 4})
    config = run_config(tmp_path, f"data.path={data}", "schedule.epochs=1", "train.batch_size=40",
                        "data.cache=true", synthetic=False)
    train(config)
    assert "corrupt_0.png" in caplog.text
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()][-1]
    assert last["bad_images"] == 1


def test_too_many_unreadable_images_fail_with_a_clear_error(tmp_path):
    data = tmp_path / "data"
    image_folder(data / "train", {"a": 10, "b": 10}, corrupt=1)  # 1 of 21: over 1%
    image_folder(data / "val", {"a": 2, "b": 2})
    config = run_config(tmp_path, f"data.path={data}", "schedule.epochs=1", "train.log_every=1",
                        synthetic=False)
    with pytest.raises(DataError, match=r"1 of 21 images .* could not be read .*corrupt_0.png"):
        train(config)


def test_cli_reports_config_errors_without_a_traceback(tmp_path):
    process = swinkit_train("--synthetic", "--output", tmp_path / "x", "optim.nope=1")
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "unknown config key 'optim.nope'" in output and "Traceback" not in output


# ---------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed"])
def test_mixed_precision_runs_on_cpu(tmp_path, precision):
    config = run_config(tmp_path, f"train.precision={precision}", "schedule.max_steps=2", "train.log_every=1")
    result = train(config)
    assert result["steps"] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    if precision == "fp16-mixed":
        assert "loss_scale" in records[0]
        assert torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)["scaler"] is not None
    swinkit.create_model(pretrained=tmp_path / "run" / "last.safetensors")



def test_memory_budget_flag_plans_recomputation(tmp_path, caplog):
    """--memory-budget picks a recomputation plan before training; an impossible budget is a clear error."""
    import logging
    from swinkit.cli import main
    common = ["train", "--synthetic", "--model", "swin_nano_patch2_window4_32", "--batch-size", "8",
              "--max-steps", "1", "--workers", "0", "--set", "data.val_split=null"]
    with caplog.at_level(logging.INFO, logger="swinkit.train"):
        assert main([*common, "--output", str(tmp_path / "ok"), "--memory-budget", "64GB"]) == 0
    assert any("memory budget" in r.message for r in caplog.records)
    assert main([*common, "--output", str(tmp_path / "tiny"), "--memory-budget", "1MB"]) == 2
    assert not (tmp_path / "tiny" / "last.ckpt").exists()


def test_auto_precision_is_bf16_only_with_bf16_units(tmp_path, monkeypatch):
    """precision "auto" resolves once, by the CPU's flags and the measured bf16/fp32 GEMM rate, and
    config.yaml names what ran."""
    from swinkit import precision
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert precision.resolve("auto", "cpu") == "fp32"
    assert precision.resolve("fp16-mixed", "cpu") == "fp16-mixed"
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 0.61)  # units, but slower than fp32
    assert precision.resolve("auto", "cpu") == "fp32"
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 1.9)
    expected = "bf16-mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    assert precision.resolve("auto", "cpu") == expected
    assert precision.autocast_dtype("auto", "cpu") == (torch.bfloat16 if expected == "bf16-mixed" else None)
    train(run_config(tmp_path, "train.precision=auto", "schedule.max_steps=1"))
    assert load_config(tmp_path / "run" / "config.yaml").train.precision == expected


def test_plain_autograd_without_the_lean_policy(tmp_path, monkeypatch):
    """model.lean=false trains the plain definition (no lean block installed); it excludes recomputation."""
    from swinkit.train import lean
    installed = []
    monkeypatch.setattr(lean, "install", lambda model, plan: installed.append(plan))
    result = train(run_config(tmp_path, "model.lean=false", "schedule.max_steps=2"))
    assert result["steps"] == 2 and installed == []
    train(run_config(tmp_path / "lean", "schedule.max_steps=1"))
    assert installed == ["none"]
    with pytest.raises(ConfigError, match="model.lean"):
        train(run_config(tmp_path / "ckpt", "model.lean=false", "model.grad_checkpointing=true"))


def test_optimizer_is_fused_adamw_with_the_default_update():
    """`swinkit train`'s AdamW runs fused on the CPU (one pass per parameter) and updates the weights as
    torch's default per-parameter AdamW does, with the official weight-decay groups."""
    from swinkit.train.optim import build_optimizer, fused_adamw_runs
    torch.manual_seed(0)
    model = swinkit.create_model(NANO)
    twin = swinkit.create_model(NANO)
    twin.load_state_dict(model.state_dict())
    fused = build_optimizer(model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8)
    assert fused.defaults["fused"] and fused_adamw_runs(model.parameters())
    twins = dict(twin.named_parameters())
    plain = torch.optim.AdamW([{"params": [twins[name] for name in names], "weight_decay": group["weight_decay"]}
                               for group, names in zip(fused.param_groups, _group_names(model, fused))],
                              lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    assert not any(group["fused"] for group in plain.param_groups)
    assert all(group["fused"] for group in fused.param_groups)
    assert {group["weight_decay"] for group in fused.param_groups} == {0.0, 0.05}
    images = torch.randn(2, 3, 32, 32)
    for _ in range(3):
        for net, optimizer in ((model, fused), (twin, plain)):
            optimizer.zero_grad()
            net(images).square().mean().backward()
            optimizer.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not fused_adamw_runs([torch.zeros(2, dtype=torch.long)])


def _group_names(model, optimizer) -> list[list[str]]:
    names = {id(p): name for name, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
