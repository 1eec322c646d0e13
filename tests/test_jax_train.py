"""swinkit.jax training: the jit step is the PyTorch trainer's step; bf16, remat and data parallel are
policies around it; `swinkit train/eval/predict --backend jax` write and read the same files."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")

import swinkit  # noqa: E402
import swinkit.jax as sj  # noqa: E402
from swinkit.cli import main as swinkit_main  # noqa: E402
from swinkit.jax import steps  # noqa: E402
from swinkit.jax.trainer import JaxTrainer  # noqa: E402
from swinkit.jax.trainer import train as train_jax  # noqa: E402
from swinkit.train.config import load_config  # noqa: E402
from swinkit.train.trainer import train as train_torch  # noqa: E402

# One stage of two blocks (plain + shifted) at 16x16 tokens: every part of a block, compiled quickly.
ONE_STAGE = dict(depths=(2,), num_heads=(1,))
V1, V2 = "swin_nano_patch2_window4_32", "swinv2_nano_patch2_window4_32"


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Runs of the same model in this module (resume, CLI) reuse compiled steps from a disk cache."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def initial_weights(path: Path, name: str = V2, **overrides) -> Path:
    """A one-stage model with seeded noise on every parameter, saved natively."""
    torch.manual_seed(0)
    model = swinkit.create_model(name, **ONE_STAGE, **overrides)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return swinkit.save_weights(model, path)


def recipe(tmp_path: Path, output: str, *overrides: str):
    return load_config(None, [
        f"model.pretrained={tmp_path / 'init.safetensors'}", "model.name=null", "data.synthetic=true",
        "data.synthetic_train_size=16", "data.synthetic_val_size=8", "train.batch_size=8", "data.workers=0",
        "schedule.epochs=1", "schedule.warmup_epochs=0", "optim.lr=1e-2", "optim.scale_lr=false",
        "optim.clip_grad=0.5", "augment.label_smoothing=0.1", "train.log_every=1", "train.device=cpu",
        "output.tensorboard=false", "output.progress=false", "output.curves=false",
        f"output.dir={tmp_path / output}", *overrides])


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def tensors_and_metadata(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# ---------------------------------------------------------------------------------- the step
def test_jax_training_matches_the_pytorch_trainer_step_for_step(tmp_path):
    """Two optimizer steps of the same recipe (no augmentation, drop path 0) from the same weights and
    batches: the same losses, grad norms and lrs, the same weights, AdamW moments and validation."""
    initial_weights(tmp_path / "init.safetensors")
    options = ("augment.enabled=false", "model.drop_path_rate=0.0")
    torch_result = train_torch(recipe(tmp_path, "torch", *options))
    jax_result = train_jax(recipe(tmp_path, "jax", *options))

    for ours, theirs in zip(records(tmp_path / "jax"), records(tmp_path / "torch"), strict=True):
        assert ours.keys() == theirs.keys()
        for key in ("loss", "train_loss", "val_loss", "grad_norm"):
            if key in ours:
                assert abs(ours[key] - theirs[key]) < 1e-5, (key, ours, theirs)
        for key in ("step", "epoch", "lr", "val_top1", "val_top5", "val_images"):
            assert ours.get(key) == theirs.get(key), key
    assert jax_result["best_top1"] == torch_result["best_top1"]

    for name in ("last.safetensors", "best.safetensors"):
        ours, our_meta = tensors_and_metadata(tmp_path / "jax" / name)
        theirs, their_meta = tensors_and_metadata(tmp_path / "torch" / name)
        assert our_meta == their_meta and ours.keys() == theirs.keys()
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], atol=1e-4, rtol=0, msg=key)
    initial, _ = tensors_and_metadata(tmp_path / "init.safetensors")
    assert max(float((theirs[k] - initial[k]).abs().max()) for k in initial) > 1e-3  # the steps moved them

    ours = torch.load(tmp_path / "jax" / "last.ckpt", weights_only=True)["optimizer"]
    theirs = torch.load(tmp_path / "torch" / "last.ckpt", weights_only=True)["optimizer"]
    assert ours["param_groups"] == theirs["param_groups"] and ours["state"].keys() == theirs["state"].keys()
    for index, state in theirs["state"].items():
        assert float(ours["state"][index]["step"]) == float(state["step"]) == 2
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours["state"][index][moment], state[moment], atol=1e-5, rtol=1e-4)


def test_resume_after_kill_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    """Mixup and drop path on; SIGTERM after step 3 of 4, then --resume: the same weights and log.
    (The kill lands mid-epoch; the resumed run draws the same mixup pairs and drop-path masks.)"""
    initial_weights(tmp_path / "init.safetensors")
    options = ("model.drop_path_rate=0.3", "data.synthetic_train_size=32", "augment.mixup=0.8",
               "augment.cutmix=0.0", "train.seed=3")
    train_jax(recipe(tmp_path, "whole", *options))

    original = JaxTrainer._optimizer_step

    def killed_after_step_3(self):
        stepped = original(self)
        if self.position["global_step"] == 2:  # the step that becomes global step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return stepped

    monkeypatch.setattr(JaxTrainer, "_optimizer_step", killed_after_step_3)
    first = train_jax(recipe(tmp_path, "split", *options))
    assert first["interrupted"] == "SIGTERM" and first["steps"] == 3
    monkeypatch.setattr(JaxTrainer, "_optimizer_step", original)
    second = train_jax(recipe(tmp_path, "split", *options, "train.resume=true"))
    assert second["steps"] == 4

    whole, split = records(tmp_path / "whole"), records(tmp_path / "split")
    drop = ("img_per_s", "epoch_time_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in split] == \
           [{k: v for k, v in r.items() if k not in drop} for r in whole]
    ours, _ = tensors_and_metadata(tmp_path / "split" / "last.safetensors")
    theirs, _ = tensors_and_metadata(tmp_path / "whole" / "last.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


# ------------------------------------------------------------------------- policies from outside
def _jaxpr(model, images) -> str:
    graphdef, state = nnx.split(model)
    return str(jax.make_jaxpr(lambda state, x: nnx.merge(graphdef, state)(x))(state, images))


def _loss_and_grads(model, images, labels):
    graphdef, params, rest = nnx.split(nnx.view(model, deterministic=True), nnx.Param, ...)

    def loss(params):
        return steps.cross_entropy(nnx.merge(graphdef, params, rest)(images), labels)
    return jax.jit(jax.value_and_grad(loss))(params)


def test_remat_recomputes_blocks_and_gives_the_same_gradients():
    model = sj.create_model(V1, **ONE_STAGE, img_size=16)
    images = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    labels = jax.numpy.array([0, 1, 2, 3])
    plain = _loss_and_grads(model, images, labels)
    steps.apply_remat(model, "nothing_saveable")
    assert "remat" in _jaxpr(model, images) and "remat" not in _jaxpr(sj.create_model(V1, **ONE_STAGE),
                                                                                 images)
    remat = _loss_and_grads(model, images, labels)
    np.testing.assert_allclose(remat[0], plain[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(remat[1]), jax.tree.leaves(plain[1])):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="remat policy"):
        steps.apply_remat(model, "no_such_policy")


def test_bf16_mixed_runs_matmuls_in_bf16_and_keeps_fp32_weights():
    model = sj.create_model(V2, **ONE_STAGE, img_size=16)
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    reference = np.asarray(sj.predict(model, images))
    steps.apply_precision(model, "bf16-mixed")
    jaxpr = _jaxpr(model, images)
    assert "bf16[" in jaxpr and "dot_general" in jaxpr  # bf16 matmuls (norms, softmax, residuals: fp32)
    logits = sj.predict(model, images)
    assert logits.dtype == jax.numpy.bfloat16  # the head is a Linear: bf16 out, as under autocast
    logits = np.asarray(logits, np.float32)
    np.testing.assert_allclose(logits, reference, atol=0.1)
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))} == {np.dtype("float32")}
    with pytest.raises(ValueError, match="precision"):
        steps.apply_precision(model, "fp16-mixed")


def test_two_devices_equal_one_device_with_the_same_global_batch():
    script = textwrap.dedent("""
        import json, jax, numpy as np
        import swinkit.jax as sj
        from swinkit.jax import steps
        assert jax.device_count() == 2
        images = np.asarray(jax.random.normal(jax.random.key(0), (8, 16, 16, 3)))
        labels = np.arange(8, dtype=np.int32) % 10
        model = sj.create_model("swin_nano_patch2_window4_32", depths=(2,), num_heads=(1,), img_size=16)
        tx = steps.build_optimizer(model, weight_decay=0.05)
        results = []
        for devices in (jax.devices()[:1], jax.devices()):
            mesh = steps.make_mesh(devices)
            state = jax.device_put(steps.init_train_state(model, tx), steps.replicated(mesh))
            x = jax.device_put(images, steps.batch_sharding(mesh))
            y = jax.device_put(labels, steps.batch_sharding(mesh))
            step = steps.make_train_step(model, tx, label_smoothing=0.1, clip_grad=1.0)
            state, metrics = step(state, x, y, 1e-3)
            shards = sorted(s.data.shape[0] for s in x.addressable_shards)
            results.append((float(metrics["loss"]), [np.asarray(p) for p in jax.tree.leaves(state.params)], shards))
        (loss1, params1, shards1), (loss2, params2, shards2) = results
        print(json.dumps({"loss": abs(loss1 - loss2), "shards": [shards1, shards2],
                          "params": max(float(np.abs(a - b).max()) for a, b in zip(params1, params2))}))
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["shards"] == [[8], [4, 4]]  # one device holds the batch; two hold half each
    # Summation order differs (per-device partial sums, then the all-reduce): float rounding only.
    # Adam's first step is ~lr * sign(grad), so a rounding-level change of a tiny gradient shows
    # as ~1e-6 here; 1e-5 is 1% of the lr.
    assert result["loss"] < 1e-5 and result["params"] < 1e-5


# --------------------------------------------------------------------------------------- the CLI
def image_folder(root: Path) -> Path:
    from PIL import Image
    rng = np.random.default_rng(0)
    for class_index, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_cli_train_eval_predict_with_the_jax_backend(tmp_path, capsys):
    data = image_folder(tmp_path / "data" / "train")
    image_folder(tmp_path / "data" / "val")
    run = tmp_path / "run"
    code = swinkit_main(["train", "--backend", "jax", "--model", V1, "--data", str(tmp_path / "data"),
                         "--output", str(run), "--max-steps", "2", "--batch-size", "4", "--workers", "0",
                         "--no-augment", "output.tensorboard=false", "output.progress=false", "output.curves=false",
                         f"model.arch.depths={list(ONE_STAGE['depths'])}",
                         f"model.arch.num_heads={list(ONE_STAGE['num_heads'])}"])
    assert code == 0
    assert {"config.yaml", "metrics.jsonl", "last.safetensors", "best.safetensors", "last.ckpt"} <= \
           {p.name for p in run.iterdir()}
    weights = run / "last.safetensors"
    torch_model = swinkit.create_model(pretrained=weights)  # the PyTorch side loads the JAX run's file
    assert torch_model.num_classes == 2
    capsys.readouterr()

    outputs = {}
    for backend in ("torch", "jax"):
        assert swinkit_main(["eval", "--backend", backend, "--weights", str(weights), "--data", str(tmp_path / "data"),
                             "--workers", "0", "--batch-size", "4", "--json"]) == 0
        evaluated = json.loads(capsys.readouterr().out)
        images = [str(p) for p in sorted(data.rglob("*.png"))[:3]]
        assert swinkit_main(["predict", "--backend", backend, "--weights", str(weights), "--json", *images]) == 0
        predicted = json.loads(capsys.readouterr().out)
        outputs[backend] = evaluated, predicted
    (torch_eval, torch_pred), (jax_eval, jax_pred) = outputs["torch"], outputs["jax"]
    assert jax_eval["images"] == torch_eval["images"] == 6
    assert jax_eval["top1"] == torch_eval["top1"] and abs(jax_eval["loss"] - torch_eval["loss"]) < 1e-4
    for ours, theirs in zip(jax_pred["results"], torch_pred["results"], strict=True):
        assert [p["class"] for p in ours["predictions"]] == [p["class"] for p in theirs["predictions"]]
        assert max(abs(a["prob"] - b["prob"]) for a, b in zip(ours["predictions"], theirs["predictions"])) < 1e-4
