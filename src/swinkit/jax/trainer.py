"""`swinkit train --backend jax`: the PyTorch trainer's run, with the model's steps run by JAX.

Everything but the arithmetic is the PyTorch trainer's (`train/trainer.py`): config resolution,
data order and augmentation (mixup/cutmix included), the lr schedule, the loop, metrics.jsonl,
TensorBoard, curves, validation bookkeeping, the run-folder lock, signals, and the files:
config.yaml, last.safetensors / best.safetensors (native, the PyTorch side loads them) and
last.ckpt. The Flax model, optimizer state and steps live here; before a file is written their
values are copied into the PyTorch model and `torch.optim.AdamW` the base class saves (Adam's
moments and step count map one to one), and on `--resume` copied back. So last.ckpt has one
format, and a run may be continued by either backend.

Dropout / drop-path masks are a function of (train.seed, micro-batch index): every random
stream is set to the index before each step, so a resumed run draws what an uninterrupted one would.

One process; with several local JAX devices the batch is sharded across them (`steps.make_mesh`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

from ..train import distributed
from ..train.config import ConfigError, TrainConfig
from ..train.evaluate import summarize
from ..train.objectives import Classification
from ..train.trainer import Trainer, _lock_run_folder
from . import convert, steps
from .api import from_torch

log = logging.getLogger("swinkit.train")


def train(config: TrainConfig) -> dict:
    """`swinkit.train.trainer.train` with the JAX backend; returns the same result dict."""
    if config.train.precision == "auto":
        # XLA:CPU's bf16 dots measured slower than its fp32 ones (Fashion-MNIST recipe, Intel Xeon with
        # AMX: 277 img/s bf16-mixed vs ~340 fp32); on a GPU bf16 is the fast one.
        config.train.precision = "bf16-mixed" if jax.default_backend() == "gpu" else "fp32"
    _check_supported(config)
    env = distributed.setup("cpu")  # the PyTorch twin only holds weights for files: it stays on the CPU
    lock = None
    try:
        lock = _lock_run_folder(Path(config.output.dir), env)
        return JaxTrainer(config, env).fit()
    finally:
        if lock is not None:
            lock.release()
        distributed.teardown()


def _check_supported(config: TrainConfig) -> None:
    unsupported = {
        "pretrain.method": config.pretrain.method is not None, "train.ema": config.train.ema,
        "train.nproc > 1": config.train.nproc > 1, "train.compile": config.train.compile,
        "model.memory_budget": config.model.memory_budget is not None,
        f"train.precision {config.train.precision}": config.train.precision not in steps.PRECISIONS,
    }
    named = [key for key, used in unsupported.items() if used]
    if named:
        raise ConfigError(f"the JAX backend does not run {', '.join(named)} (it runs classification on the local "
                          f"devices, precision {' or '.join(steps.PRECISIONS)}; model.grad_checkpointing "
                          "rematerialises blocks)")


class JaxClassification(Classification):
    """Classification, validated by the JAX eval step (fixed batch shape: no recompilation for the last batch)."""

    def _evaluate(self, module) -> dict:
        t = self.trainer
        totals = {"images": 0, "correct_top1": 0, "correct_top5": 0, "loss_sum": 0.0}
        batch_size = t.config.train.batch_size
        for images, labels in t.data.val_loader:
            images, labels, valid = _padded(_nhwc(images), np.asarray(labels, np.int32), batch_size)
            counts = t.eval_step(t.state.params, t.state.rest, t.put_batch(images), t.put_batch(labels),
                                 t.put_batch(valid))
            for key in totals:
                totals[key] += float(counts[key])
        return summarize({k: (int(v) if k != "loss_sum" else v) for k, v in totals.items()})


class JaxTrainer(Trainer):
    """`Trainer` whose forward, backward, optimizer step and evaluation run in JAX."""

    def _build_model_and_optimizer(self) -> None:
        super()._build_model_and_optimizer()  # the schedule, total steps, and the PyTorch twin that files come from
        cfg = self.config
        self.objective = JaxClassification(self)
        model = from_torch(self.backbone, seed=cfg.train.seed)
        steps.apply_precision(model, cfg.train.precision)
        if cfg.model.grad_checkpointing:
            steps.apply_remat(model, "nothing_saveable")
        self.tx = steps.build_optimizer(model, weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas),
                                        eps=cfg.optim.eps)
        self.jax_model = model
        self.mesh = steps.make_mesh() if jax.device_count() > 1 else None
        self.state = self._placed(steps.init_train_state(model, self.tx))
        self.train_step = steps.make_train_step(
            model, self.tx, label_smoothing=cfg.augment.label_smoothing, clip_grad=cfg.optim.clip_grad,
            lr_scale=steps.lr_scales(model, cfg.optim.layer_decay), accumulation_steps=cfg.optim.accumulation_steps)
        self.eval_step = steps.make_eval_step(model)
        self.grad_norm = 0.0
        if self.env.is_main:
            log.info("JAX backend: %s, precision %s%s", ", ".join(str(d) for d in jax.devices()),
                     cfg.train.precision, ", blocks rematerialised" if cfg.model.grad_checkpointing else "")

    # ------------------------------------------------------------------ placement
    def _placed(self, state: steps.TrainState) -> steps.TrainState:
        return state if self.mesh is None else jax.device_put(state, steps.replicated(self.mesh))

    def put_batch(self, array: np.ndarray, leading_axes: int = 0) -> jax.Array:
        """A host batch on the devices: sharded along its batch axis over the mesh, if there is one."""
        if self.mesh is None:
            return jnp.asarray(array)
        return jax.device_put(array, steps.batch_sharding(self.mesh, leading_axes))

    # ------------------------------------------------------------------ the step
    def _forward_backward(self, batches) -> None:
        """`accumulation_steps` micro-batches -> one jitted step (forward, backward, clip, AdamW)."""
        accumulation = self.config.optim.accumulation_steps
        images, targets, counts = [], [], []
        for _ in range(accumulation):
            batch, labels = next(batches)
            if self.data.mix is not None:
                batch, target = self.data.mix(batch, labels)
                targets.append(target.float().numpy())
            else:
                targets.append(np.asarray(labels, np.int32))
            images.append(_nhwc(batch))
            counts.append(int(labels.shape[0]))
        leading = 0 if accumulation == 1 else 1
        images = images[0] if accumulation == 1 else np.stack(images)
        targets = targets[0] if accumulation == 1 else np.stack(targets)
        micro_index = self.position["global_step"] * accumulation
        state = self.state.replace(rest=seek_random_streams(self.state.rest, micro_index))
        self.state, metrics = self.train_step(state, self.put_batch(images, leading), self.put_batch(targets, leading),
                                              jnp.float32(self.schedule.lr))
        self.last_metrics = metrics
        for count in counts:  # the mean over micro-batches, once per micro-batch: the same sums as PyTorch's
            self.since_last_log.add(metrics["loss"], count)
            self.epoch_totals.add(metrics["loss"], count)

    def _optimizer_step(self) -> bool:
        """The step already ran in `_forward_backward`; report it as the PyTorch trainer does."""
        self.grad_norm = self.last_metrics["grad_norm"]
        return bool(self.last_metrics["stepped"])

    # ------------------------------------------------------------------ files and resume
    def _to_torch(self, with_optimizer: bool = False) -> None:
        """Copy the JAX weights (and Adam's state) into the PyTorch model (and AdamW) the base class writes."""
        params = jax.device_get(self.state.params)
        with torch.no_grad():
            self.backbone.load_state_dict(convert.to_torch_state(params))
        if not with_optimizer:
            return
        adam = self.state.opt_state[0]
        step = int(adam.count)
        if step == 0:
            return
        moments = convert.to_torch_state(jax.device_get(adam.mu)), convert.to_torch_state(jax.device_get(adam.nu))
        for name, param in self.backbone.named_parameters():
            self.optimizer.state[param] = {"step": torch.tensor(float(step)), "exp_avg": moments[0][name],
                                           "exp_avg_sq": moments[1][name]}

    def _from_torch(self) -> None:
        """The JAX state from the PyTorch model and AdamW the base class restored (`--resume`)."""
        template = self.state.params
        params = convert.from_torch_state(template, self.backbone.state_dict(), "the resumed checkpoint")
        opt_state = self.tx.init(params)
        named = dict(self.backbone.named_parameters())
        first = self.optimizer.state.get(next(iter(named.values())), {})
        if first:
            mu = convert.from_torch_state(template, {n: self.optimizer.state[p]["exp_avg"] for n, p in named.items()})
            nu = convert.from_torch_state(template, {n: self.optimizer.state[p]["exp_avg_sq"]
                                                     for n, p in named.items()})
            count = jnp.asarray(int(first["step"]), jnp.int32)
            opt_state = (optax.ScaleByAdamState(count=count, mu=mu, nu=nu), *opt_state[1:])
        self.state = self._placed(steps.TrainState(params, self.state.rest, opt_state))

    def _write_weights(self, state, path, source, module=None) -> None:
        self._to_torch()
        super()._write_weights(state, path, source, module)

    def _save(self) -> None:
        if self.saved_position != self.position:
            self._to_torch(with_optimizer=True)
        super()._save()

    def _restore(self, state: dict) -> None:
        super()._restore(state)
        self._from_torch()


def seek_random_streams(rest: nnx.State, count: int) -> nnx.State:
    """Every random stream in `rest` set to draw its `count`-th mask next (masks as a function of the
    micro-batch index, so resuming needs no saved random state)."""
    counts, others = nnx.split_state(rest, nnx.RngCount, ...)
    counts = jax.tree.map(lambda c: jnp.full_like(c, count), counts)
    return nnx.merge_state(counts, others)


def _nhwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).contiguous().numpy()


def _padded(images: np.ndarray, labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A short batch zero-padded to `size` rows, with the mask of its real rows."""
    valid = np.zeros(size, bool)
    valid[:len(labels)] = True
    missing = size - len(labels)
    if missing > 0:
        images = np.concatenate([images, np.zeros((missing, *images.shape[1:]), images.dtype)])
        labels = np.concatenate([labels, np.zeros(missing, labels.dtype)])
    return images, labels, valid
