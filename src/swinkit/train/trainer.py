"""The training loop. `train(config)` builds data, model and optimizer, then runs

    for each epoch:
        for each optimizer step:  micro-batches: data -> forward -> loss -> backward (accumulated)
                                  clip -> step -> EMA -> lr schedule -> log -> last.ckpt every save_every
        validate -> best.safetensors -> last.ckpt

on one process or under torchrun (DDP; FSDP with `train.strategy: fsdp`). Rank 0 alone
writes files, and holds the run folder's lock for the whole run. SIGTERM / SIGINT stop the
loop at the next step boundary, after a save (`train/signals.py`). See `train/data.py` for why
data order and augmentation are reproducible, `train/checkpoint.py` for what `last.ckpt` holds
(together they make `--resume` exact) and `train/distributed.py` for everything that knows
about more than one process.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..api import create_model, load_weights, save_weights
from ..data.transforms import channel_stats
from ..files import FolderLock, remove_stale_temps
from ..metadata import META_CLASSES, META_STEP, META_WEIGHTS, Preprocess
from ..models.registry import SwinConfig
from ..models.swin import SwinTransformer
from ..precision import autocast_dtype, ensure_denormals_flushed
from ..precision import resolve as resolve_precision
from ..weights.io import CheckpointError
from . import distributed, lean
from .checkpoint import (LAST, PREVIOUS, ModelEma, capture_rng, check_state_fits, load_train_state, restore_rng,
                         save_train_state, seed_everything)
from .config import ConfigError, ModelSection, TrainConfig, save_config
from .data import UnreadableImages, build_training_data, open_image_folders
from .objectives import build_objective
from ..allocator import keeping_freed_memory, returning_freed_memory
from .logs import MetricsLog, TensorBoard, plot_curves, progress_bar
from .optim import WarmupCosineSchedule, build_optimizer, scaled_lrs
from .signals import StopSignals

log = logging.getLogger("swinkit.train")

def train(config: TrainConfig) -> dict:
    """Run (or, with `train.resume`, continue) training as `config` says; returns the final metrics.

    "interrupted" in the result is None, or the name of the signal ("SIGTERM", "SIGINT") that
    stopped the run early, after saving a checkpoint to continue from with `train.resume`.
    A second run in the same folder fails with `FolderInUseError` naming the first.
    """
    env = distributed.setup(config.train.device)
    config.train.precision = resolve_precision(config.train.precision, env.device)
    lock, finished = None, False
    try:
        lock = _lock_run_folder(Path(config.output.dir), env)
        result = Trainer(config, env).fit()
        finished = True
        return result
    finally:
        if lock is not None:
            lock.release()
        distributed.teardown(wait_for_peers=finished)


def _lock_run_folder(out: Path, env: distributed.DistEnv) -> FolderLock | None:
    """Rank 0 locks `out` before anything in it is read or written, then removes the temporary files
    of writes a killed run left; when it cannot lock, every rank raises."""
    lock, error = None, None
    if env.is_main:
        try:
            lock = FolderLock(out, "training run")
        except Exception as caught:  # reported below, once every rank knows
            error = caught
    if distributed.all_reduce_max(int(error is not None), env):
        raise error if error is not None else ConfigError(f"rank 0 could not lock the run folder '{out}'")
    if env.is_main:
        stale = remove_stale_temps(out)
        if stale:
            log.warning("%s: removed %d temporary file(s) left by an interrupted write: %s", out, len(stale),
                        ", ".join(path.name for path in stale))
    return lock


def build_model(section: ModelSection, num_classes: int | None = None) -> SwinTransformer:
    """A registry model (`name`, with `arch` overrides) or a SwinConfig spelled out in `arch`;
    `pretrained` weights of any layout are loaded and adapted (head, size, window)."""
    arch = {k: tuple(v) if isinstance(v, list) else v for k, v in section.arch.items()}
    sizes = {k: v for k, v in dict(num_classes=num_classes, img_size=section.img_size, in_chans=section.in_chans,
                                   drop_path_rate=section.drop_path_rate).items() if v is not None}
    if section.name is not None or (section.pretrained is not None and not arch):
        return create_model(section.name, pretrained=section.pretrained, **sizes, **arch)
    try:
        config = SwinConfig.from_dict(arch).replace(**sizes)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model.arch: {error}") from None
    model = SwinTransformer(config)
    if section.pretrained is not None:
        load_weights(model, section.pretrained)
    return model


def _channel_values(values, in_chans: int, what: str) -> list[float]:
    """`data.mean` / `data.std` for `in_chans` channels (see `data.transforms.channel_stats`)."""
    try:
        return list(channel_stats(values, in_chans, f"data.{what}"))
    except ValueError as error:
        raise ConfigError(str(error)) from None


@dataclass
class RunningTotals:
    """This rank's sums since the last `reset`, behind a logged mean. Checkpointed (but for
    `images`, which only feeds this process's throughput), so a resumed run logs the same numbers."""
    loss: torch.Tensor | float = 0.0  # a device tensor while training: no host sync per micro-batch
    micro_batches: int = 0
    images: int = 0
    skipped_steps: int = 0  # optimizer steps skipped for non-finite gradients

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.loss += loss
        self.micro_batches += 1
        self.images += images

    def reset(self) -> None:
        self.loss, self.micro_batches, self.images, self.skipped_steps = 0.0, 0, 0, 0

    def mean(self) -> float:
        """The mean loss per micro-batch."""
        return float(self.loss) / max(self.micro_batches, 1)

    def over_ranks(self, env: distributed.DistEnv) -> RunningTotals:
        """The sums over all ranks (float64)."""
        return RunningTotals(*distributed.all_reduce_sum(
            [float(self.loss), self.micro_batches, self.images, self.skipped_steps], env))

    def state_dict(self) -> dict:
        return {"loss": float(self.loss), "micro_batches": self.micro_batches, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.loss, self.micro_batches, self.skipped_steps = state["loss"], state["micro_batches"], state["skipped_steps"]


class Trainer:
    memory_plan = None  # what `model.memory_budget` planned (`_apply_memory_policy`); None: no budget

    def __init__(self, config: TrainConfig, env: distributed.DistEnv):
        self.config, self.env, self.device = config, env, env.device
        self.out = Path(config.output.dir)
        self.stop = StopSignals(announce=env.is_main)  # entered by `fit`
        self.resume_path: Path | None = None  # the checkpoint this run continues
        self.amp_dtype = autocast_dtype(config.train.precision)
        if config.train.strategy == "fsdp" and config.train.ema:
            raise ConfigError("train.ema is not supported with train.strategy fsdp")

        resume = self._resume_state()
        seed_everything(config.train.seed)
        train_folder, val_folder = open_image_folders(config.data, config.train.seed,
                                                      unlabelled=config.pretrain.method is not None)
        classes = train_folder.classes if train_folder is not None else None
        self.objective = build_objective(self)  # classification, or pre-training without labels
        labelled = self.objective.labelled
        num_classes = (len(classes) if classes else config.model.num_classes) if labelled else 0
        self.backbone = build_model(config.model, num_classes=num_classes)  # the Swin model itself
        if labelled and classes is not None and self.backbone.num_classes != len(classes):
            raise ConfigError(f"model.num_classes is {self.backbone.num_classes} but {config.data.path} "
                              f"has {len(classes)} classes")
        self.classes = (classes or [f"class_{i}" for i in range(self.backbone.num_classes)]) if labelled else []
        self.model_raw = self.objective.wrap(self.backbone)  # what is trained (the backbone, or SimMIM around it)
        model_config = self.backbone.config
        in_chans = model_config.in_chans
        self.preprocess = Preprocess(model_config.img_size, in_chans,
                                     _channel_values(config.data.mean or model_config.mean, in_chans, "mean"),
                                     _channel_values(config.data.std or model_config.std, in_chans, "std"),
                                     config.data.crop_pct, config.data.interpolation)
        self._resolve_config()
        self.data = build_training_data(config, self.preprocess, env, len(self.classes) or 1,
                                        train_folder, val_folder)
        self.unreadable = UnreadableImages([train_folder, val_folder], config.data.max_bad_fraction)
        self.unreadable.check(env)  # data.cache has read every image already
        self._build_model_and_optimizer()

        self.best = {"top1": -1.0, "epoch": None, "step": None, "weights": None}
        self.position = {"epoch": 0, "micro_step": 0, "global_step": 0}  # micro_step: consumed in this epoch
        self.saved_position: dict | None = None  # where last.ckpt stands
        self.since_last_log, self.epoch_totals = RunningTotals(), RunningTotals()
        if resume is not None:
            self._restore(resume)
        else:
            seed_everything(config.train.seed + env.rank)  # per-rank stream for mixup and drop path
        self._open_logs(resumed=resume is not None)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Train to `total_steps`. On CPU, under a memory budget that binds (`train.memory.budget_binds`),
        freed memory goes back to the OS while training runs, and otherwise glibc keeps it for reuse
        (`swinkit.allocator`). On CPU, denormals are
        flushed to zero (`precision.flush_denormals`: the shift mask's softmax weights, ~1e-44, are slow otherwise)."""
        if self.device.type == "cpu":
            ensure_denormals_flushed()
        plan = self.memory_plan
        cpu = self.device.type == "cpu"
        returning = plan is not None and plan.return_freed_memory and cpu
        # where no budget binds, freed memory stays mapped for the next step (no fresh zeroed pages)
        allocator = returning_freed_memory() if returning else keeping_freed_memory() if cpu else nullcontext()
        with allocator, self.stop:
            return self._train()

    def _train(self) -> dict:
        """Optimizer steps up to `total_steps`; validation and last.ckpt at every epoch end. A stop request
        (SIGTERM / SIGINT) ends the run at the next step boundary, after a save."""
        accumulation, batches_per_epoch = self.config.optim.accumulation_steps, self.data.sampler.batches_per_epoch
        log_every, save_every = self.config.train.log_every, self.config.train.save_every
        if self.position["global_step"] >= self.total_steps:
            if self.env.is_main:
                log.warning("%s: the run is already complete (%d steps)", self.out, self.total_steps)
            return self._finish(None)
        started = self.last_log_time = time.perf_counter()
        while self.position["global_step"] < self.total_steps:
            epoch, epoch_started = self.position["epoch"], time.perf_counter()
            self.data.sampler.set_position(epoch, self.position["micro_step"])
            batches = iter(self.data.train_loader)
            bar = self._progress_bar(epoch)
            self.model.train()
            while self.position["micro_step"] < batches_per_epoch:
                self._forward_backward(batches)  # `accumulation` micro-batches: data -> forward -> loss -> backward
                if not self._optimizer_step():  # unscale -> clip -> step -> EMA
                    self.since_last_log.skipped_steps += 1
                self.schedule.step()
                self.position["global_step"] += 1
                self.position["micro_step"] += accumulation
                step = self.position["global_step"]
                if bar is not None:
                    bar.update(1)
                if step % log_every == 0 or step == self.total_steps:
                    self._log_step(bar)
                    self.unreadable.check(self.env)  # too many unreadable images: stop early
                if step >= self.total_steps:
                    break
                if save_every and step % save_every == 0 and self.position["micro_step"] < batches_per_epoch:
                    self._save()  # (an epoch end saves anyway)
                if self.position["micro_step"] < batches_per_epoch and (signum := self._stop_requested()):
                    if bar is not None:
                        bar.close()
                    return self._interrupted(signum)  # (at an epoch end: after validation, below)
            if bar is not None:
                bar.close()
            last_eval = self._end_of_epoch(epoch, time.perf_counter() - epoch_started)
            self._save()
            if self.position["global_step"] < self.total_steps and (signum := self._stop_requested()):
                return self._interrupted(signum)
        return {**self._finish(last_eval), "train_seconds": time.perf_counter() - started}

    def _stop_requested(self) -> int:
        """The signal that asked the run to stop, or 0; under torchrun the largest over all ranks, so that
        every rank stops at the same step."""
        return distributed.all_reduce_max(self.stop.requested, self.env)

    def _interrupted(self, signum: int) -> dict:
        """Save where the run stands and end it early (all ranks call)."""
        self._save()
        name = signal.Signals(signum).name
        if self.env.is_main:
            print(f"{name}: stopped at step {self.position['global_step']}/{self.total_steps}; saved "
                  f"{self.out / LAST}, continue with --resume", flush=True)
        return {**self._finish(None), "interrupted": name}

    def _forward_backward(self, batches) -> None:
        """Gradients of `accumulation_steps` micro-batches from `batches`, summed into `.grad`."""
        accumulation = self.config.optim.accumulation_steps
        for micro in range(accumulation):
            images, labels = next(batches)
            with distributed.no_sync(self.model, accumulating=micro < accumulation - 1):
                loss = self.objective.batch_loss(images, labels)  # to the device, forward under autocast, loss
                self.scaler.scale(loss / accumulation).backward()
            loss = loss.detach()
            self.since_last_log.add(loss, labels.shape[0])
            self.epoch_totals.add(loss, labels.shape[0])

    def _optimizer_step(self) -> bool:
        """Clip, step, update EMA; returns False when the step was skipped (non-finite gradients)."""
        self.scaler.unscale_(self.optimizer)
        clip = self.config.optim.clip_grad
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model_raw.parameters(), clip if clip else float("inf"))
        grad_norm = distributed.full_tensor(grad_norm)
        if self.scaler.is_enabled():
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skips the step itself when gradients are inf/nan
            self.scaler.update()
            stepped = self.scaler.get_scale() >= scale
        else:
            stepped = bool(torch.isfinite(grad_norm))
            if stepped:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if stepped and self.ema is not None:
            self.ema.update(self.model_raw)
        self.grad_norm = grad_norm.detach()
        return stepped

    # ------------------------------------------------------------------ logging and validation
    def _progress_bar(self, epoch: int):
        done = self.position["micro_step"] // self.config.optim.accumulation_steps
        return progress_bar(self.env.is_main and self.config.output.progress, self.steps_per_epoch, done,
                            f"epoch {epoch + 1}/{self.config.schedule.epochs}")

    def _log_step(self, bar) -> None:
        """One metrics.jsonl record from the totals since the last one (all ranks call; rank 0 writes)."""
        totals = self.since_last_log.over_ranks(self.env)
        elapsed = time.perf_counter() - self.last_log_time
        record = {"step": self.position["global_step"], "epoch": self.position["epoch"], "loss": totals.mean(),
                  "lr": self.schedule.lr,
                  "img_per_s": totals.images / elapsed if elapsed > 0 else None, "grad_norm": float(self.grad_norm)}
        if totals.skipped_steps:
            record["skipped_steps"] = int(totals.skipped_steps)
            if self.env.is_main:
                log.warning("step %d: %d optimizer step(s) skipped for non-finite gradients", record["step"],
                            int(totals.skipped_steps))
        if self.scaler.is_enabled():
            record["loss_scale"] = self.scaler.get_scale()
        self.since_last_log.reset()
        self.last_log_time = time.perf_counter()
        if not self.env.is_main:
            return
        self.metrics.write(record)
        self.tensorboard.scalars({"train/loss": record["loss"], "train/lr": record["lr"],
                                  "train/img_per_s": record["img_per_s"] or 0.0,
                                  "train/grad_norm": record["grad_norm"]}, record["step"])
        if bar is not None:
            bar.set_postfix(step=record["step"], loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                            img_s=f"{record['img_per_s'] or 0:.0f}")

    def _end_of_epoch(self, epoch: int, seconds: float) -> dict | None:
        """Advance past a finished epoch (not one cut short by max_steps), validate, record the epoch."""
        train_loss = self.epoch_totals.over_ranks(self.env).mean()
        if self.position["micro_step"] >= self.data.sampler.batches_per_epoch:
            self.position.update(epoch=epoch + 1, micro_step=0)
            self.epoch_totals.reset()
        record = {"step": self.position["global_step"], "epoch": epoch + 1, "train_loss": train_loss,
                  "epoch_time_s": seconds}
        finished = self.position["global_step"] >= self.total_steps
        due = finished or (epoch + 1) % self.config.train.val_every == 0
        result = self.objective.validate(epoch, record) if self.data.val_loader is not None and due else None
        self.objective.end_of_epoch(epoch)
        record["bad_images"] = self.unreadable.check(self.env)
        if not self.env.is_main:
            return result
        self.unreadable.report()
        self.metrics.write(record)
        self.tensorboard.scalars({"val/top1": record.get("val_top1"), "val/top5": record.get("val_top5"),
                                  "val/loss": record.get("val_loss"), "train/epoch_loss": train_loss,
                                  "val/ema_top1": record.get("ema_val_top1")}, record["step"])
        if self.config.output.curves:
            plot_curves(self.metrics.records, self.out / "curves.png")
        summary = f"epoch {epoch + 1}/{self.config.schedule.epochs} step {record['step']}/{self.total_steps} " \
                  f"train loss {train_loss:.4f}"
        if result is not None:
            summary += self.objective.summary(result)
        print(f"{summary}  ({seconds:.1f} s)", flush=True)
        return result

    def _finish(self, last_eval: dict | None) -> dict:
        if self.env.is_main:
            self.metrics.close()
            self.tensorboard.close()
        return {"output": str(self.out), "steps": self.position["global_step"], "best_top1": self.best["top1"],
                "val": last_eval, "interrupted": None}

    # ------------------------------------------------------------------ setup
    def _resume_state(self) -> dict | None:
        """The state to continue from: last.ckpt, or previous.ckpt (with a warning) when last.ckpt is
        missing or unreadable; None to start afresh."""
        last, previous = self.out / LAST, self.out / PREVIOUS
        if not self.config.train.resume:
            held = next((path for path in (last, previous) if path.exists()), None)
            if held is not None:
                raise ConfigError(f"{self.out} already holds a run ({held}); pass --resume to continue it "
                                  "or choose another --output")
            return None
        failures = []
        for path in (last, previous):
            if not path.exists():
                continue
            try:
                state = load_train_state(path)
            except CheckpointError as error:
                failures.append(error)
                continue
            if path != last and self.env.is_main:
                why = "is missing"
                if failures:  # set it aside, or the next save would rotate it into previous.ckpt
                    aside = last.with_name(LAST + ".unreadable")
                    os.replace(last, aside)
                    why = f"is unreadable ({failures[0]}; kept as {aside.name})"
                log.warning("--resume: %s %s; resuming from %s (step %d) instead", last, why, path,
                            state["position"]["global_step"])
            self.resume_path = path
            return state
        if failures:
            if len(failures) == 2:
                also = f"{PREVIOUS} is unreadable too"
            elif last.exists():
                also = f"there is no {PREVIOUS} to fall back on"
            else:
                also = f"there is no {LAST}"
            raise CheckpointError(f"{failures[0]}; and {also}")
        if self.env.is_main:
            log.warning("--resume: %s has no %s yet; starting from scratch", self.out, LAST)
        return None

    def _resolve_config(self) -> None:
        """Write back what was left to defaults, so config.yaml says what actually ran."""
        model, pre = self.config.model, self.preprocess
        if self.objective.labelled:  # a pre-training encoder has no head: its recipe's count stays as written
            model.num_classes = self.backbone.num_classes
        model.img_size = pre.img_size[0] if pre.img_size[0] == pre.img_size[1] else None
        model.in_chans = pre.in_chans
        model.drop_path_rate = self.backbone.config.drop_path_rate
        self.config.data.mean, self.config.data.std = list(pre.mean), list(pre.std)

    def _build_model_and_optimizer(self) -> None:
        cfg, env, model = self.config, self.env, self.model_raw
        model.to(self.device)
        self._apply_memory_policy(self.backbone)
        self.fsdp = env.distributed and cfg.train.strategy == "fsdp"
        if self.fsdp:
            distributed.shard(model)
        self.ema = ModelEma(model, cfg.train.ema_decay) if cfg.train.ema else None
        runnable: nn.Module = torch.compile(model) if cfg.train.compile else model
        self.model = distributed.replicate(runnable, env) if env.distributed and not self.fsdp else runnable

        optim, schedule = cfg.optim, cfg.schedule
        self.optimizer = build_optimizer(model, lr=optim.lr, weight_decay=optim.weight_decay, betas=optim.betas,
                                         eps=optim.eps, layer_decay=optim.layer_decay)
        images_per_step = self.data.sampler.global_batch * optim.accumulation_steps
        peak, warmup_lr, min_lr = scaled_lrs(optim.lr, schedule.warmup_lr, schedule.min_lr, images_per_step,
                                             optim.lr_reference_batch, optim.scale_lr)
        self.steps_per_epoch = self.data.sampler.batches_per_epoch // optim.accumulation_steps  # >= 1 (sampler)
        self.total_steps = schedule.epochs * self.steps_per_epoch
        if schedule.max_steps is not None:
            self.total_steps = min(self.total_steps, schedule.max_steps)
        warmup_steps = round(schedule.warmup_epochs * self.steps_per_epoch)
        self.schedule = WarmupCosineSchedule(self.optimizer, peak, warmup_lr, min_lr, warmup_steps, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.precision == "fp16-mixed")
        if env.is_main:
            log.info("%s: %.2fM params, %d steps (%d per epoch), %d images per step, peak lr %.3g",
                     self.backbone.name or "model", sum(p.numel() for p in model.parameters()) / 1e6,
                     self.total_steps, self.steps_per_epoch,
                     images_per_step, peak)

    def _apply_memory_policy(self, model: SwinTransformer) -> None:
        """Install the lean training policy (`train.lean`: lean saved tensors, oneDNN GEMMs) with what
        each block recomputes in backward: nothing, every block (`model.grad_checkpointing`) or the
        plan that fits `model.memory_budget` (train/memory.py); nothing with `model.lean: false`."""
        cfg = self.config
        self.memory_plan = None
        if cfg.model.grad_checkpointing and cfg.model.memory_budget:
            raise ConfigError("model.grad_checkpointing and model.memory_budget exclude each other: "
                              "the budget picks the recomputation itself")
        if not cfg.model.lean:
            # Small models with memory to spare: autograd of the plain definition keeps every
            # intermediate and recomputes nothing (the lean kernels' LayerNorm/GELU recomputation
            # and oneDNN's small GEMMs then cost time for memory nobody needs).
            if cfg.model.grad_checkpointing or cfg.model.memory_budget:
                raise ConfigError("model.lean: false excludes model.grad_checkpointing and model.memory_budget "
                                  "(recomputation is part of the lean policy)")
            return
        lean.install(model, "full" if cfg.model.grad_checkpointing else "none")
        if cfg.model.memory_budget:
            from .memory import apply_memory_budget
            try:
                self.memory_plan = apply_memory_budget(model, cfg.train.batch_size, cfg.model.memory_budget,
                                    img_size=self.preprocess.img_size, in_chans=self.preprocess.in_chans,
                                    precision=cfg.train.precision, ema=cfg.train.ema,
                                    log=log.info if self.env.is_main else None)
            except ValueError as error:
                raise ConfigError(f"model.memory_budget: {error}") from None

    def _open_logs(self, resumed: bool) -> None:
        self.metrics = self.tensorboard = None
        if not self.env.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(self.config, self.out / "config.yaml")
        step = self.position["global_step"] if resumed else None
        self.metrics = MetricsLog(self.out / "metrics.jsonl", resume_step=step)
        tb_dir = self.out / "tensorboard" if self.config.output.tensorboard else None
        self.tensorboard = TensorBoard(tb_dir, purge_step=None if step is None else step + 1)

    # ------------------------------------------------------------------ checkpoints
    def _weights_metadata(self, source: str) -> dict:
        return {META_CLASSES: json.dumps(self.classes), **self.preprocess.to_metadata(),
                META_WEIGHTS: source, META_STEP: str(self.position["global_step"])}

    def _write_weights(self, state: dict | None, path: Path, source: str, module: nn.Module | None = None) -> None:
        """`source` ("model" or "ema") as safetensors: `module` (default: the trained model or its EMA);
        under FSDP `state`, gathered on rank 0, with the backbone's metadata."""
        if self.fsdp:
            from ..api import model_metadata
            from ..weights.io import write_safetensors
            write_safetensors(state, path, model_metadata(self.backbone, self._weights_metadata(source)))
        else:
            module = module or (self.ema.module if source == "ema" else self.model_raw)
            save_weights(module, path, metadata=self._weights_metadata(source))

    def _write_encoder(self, state: dict | None, path: Path) -> None:
        """The backbone alone (no head, no mask token) of a pre-training run, for fine-tuning."""
        if state is not None:  # FSDP: the gathered SimMIM state, keys `encoder.*` and `decoder.*`
            state = {k[len("encoder."):]: v for k, v in state.items()
                     if k.startswith("encoder.") and k != "encoder.mask_token"}
        self._write_weights(state, path, "model", module=self.backbone)

    def _save(self) -> None:
        """last.ckpt at the current position (read back before it replaces the old one, which becomes
        previous.ckpt), then last.safetensors: a failed save leaves the pair as it was, and the weights
        never run ahead of the checkpoint (all ranks call; rank 0 writes)."""
        if self.saved_position == self.position:
            return
        rng = distributed.all_gather_objects(capture_rng(), self.env)
        running = distributed.all_gather_objects({"since_last_log": self.since_last_log.state_dict(),
                                                  "epoch": self.epoch_totals.state_dict()}, self.env)
        model_state = distributed.model_state(self.model_raw, self.fsdp)
        optimizer_state = distributed.optimizer_state(self.model_raw, self.optimizer, self.fsdp)
        if self.env.is_main:
            save_train_state({
                "model": model_state, "optimizer": optimizer_state, "scheduler": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "rng": rng, "position": dict(self.position), "best": dict(self.best), "running": running,
                "world_size": self.env.world_size, "global_batch": self.data.sampler.global_batch,
                "config": self.config.to_dict(),
            }, self.out / LAST, previous=self.out / PREVIOUS)
            self._write_weights(model_state, self.out / "last.safetensors", "model")
        distributed.barrier(self.env)
        self.saved_position = dict(self.position)

    def _restore(self, state: dict) -> None:
        path = self.resume_path
        if state["global_batch"] != self.data.sampler.global_batch:
            raise CheckpointError(f"'{path}' was trained with a global batch of {state['global_batch']} "
                                  f"images per micro-step; this run has {self.data.sampler.global_batch} "
                                  "(batch_size x processes must match to resume)")
        check_state_fits(self.model_raw, state["model"], path)
        try:
            distributed.load_state(self.model_raw, self.optimizer, state["model"], state["optimizer"], self.fsdp)
            self.schedule.load_state_dict(state["scheduler"])
            if state["scaler"] is not None:
                self.scaler.load_state_dict(state["scaler"])
            if self.ema is not None and state["ema"] is not None:
                self.ema.load_state_dict(state["ema"])
            self.position = dict(state["position"])
            self.best = dict(state["best"])
            rank = self.env.rank
            if state["running"]:
                running = state["running"][rank if rank < len(state["running"]) else 0]
                self.since_last_log.load_state_dict(running["since_last_log"])
                self.epoch_totals.load_state_dict(running["epoch"])
            restore_rng(state["rng"][rank if rank < len(state["rng"]) else 0])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:  # the file's, not the code's
            first_line = (str(error).splitlines() or [""])[0]
            raise CheckpointError(f"'{path}' cannot be resumed from: {type(error).__name__}: {first_line}") \
                from error
        self.saved_position = dict(self.position)
        if self.env.is_main:
            print(f"resumed {self.out} at epoch {self.position['epoch'] + 1}, step {self.position['global_step']}",
                  flush=True)
