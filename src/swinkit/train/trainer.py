"""The training loop. `train(config)` builds data, model and optimizer, then runs

    for each epoch:  for each optimizer step: accumulate micro-batches -> clip -> step -> EMA -> log / save
                     validate -> best.safetensors -> last.ckpt

on one process or under torchrun (DDP; FSDP with `train.strategy: fsdp`). Rank 0 alone
writes files. See `train/data.py` for why data order and augmentation are reproducible and
`train/checkpoint.py` for what `last.ckpt` holds; together they make `--resume` exact.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..api import create_model, load_weights, save_weights
from ..data import (DataError, ImageFolderDataset, SyntheticDataset, build_eval_transform, build_mixup_cutmix,
                    build_train_transform, resolve_split)
from ..data.transforms import channel_stats
from ..infer.runner import META_CLASSES, Preprocess
from ..models.registry import SwinConfig
from ..models.swin import SwinTransformer
from ..weights.io import CheckpointError
from . import distributed
from .checkpoint import ModelEma, capture_rng, load_train_state, restore_rng, save_train_state, seed_everything
from .config import ConfigError, ModelSection, TrainConfig, save_config
from .data import (CachedEvalLoader, CachedSplit, CachedTrainLoader, GlobalBatchSampler, SeededTransformDataset,
                   shard_indices)
from .evaluate import evaluate_model, summarize
from .logs import MetricsLog, TensorBoard, plot_curves, progress_enabled
from .optim import WarmupCosineSchedule, build_optimizer, scaled_lrs

log = logging.getLogger("swinkit.train")

AMP_DTYPES = {"fp32": None, "bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


def train(config: TrainConfig) -> dict:
    """Run (or, with `train.resume`, continue) training as `config` says; returns the final metrics."""
    env = distributed.setup(config.train.device)
    try:
        return Trainer(config, env).fit()
    finally:
        distributed.teardown()


# ------------------------------------------------------------------------------------------- building
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


class Trainer:
    def __init__(self, config: TrainConfig, env: distributed.DistEnv):
        self.config, self.env = config, env
        self.device = env.device
        self.out = Path(config.output.dir)
        cfg_train = config.train
        self.amp_dtype = AMP_DTYPES[cfg_train.precision]
        if cfg_train.strategy == "fsdp" and cfg_train.ema:
            raise ConfigError("train.ema is not supported with train.strategy fsdp")

        resume = self._resume_state()
        seed_everything(cfg_train.seed)
        classes, train_base, val_base = self._datasets()
        self.model_raw = build_model(config.model, num_classes=len(classes) if classes else config.model.num_classes)
        if classes is not None and self.model_raw.num_classes != len(classes):
            raise ConfigError(f"model.num_classes is {self.model_raw.num_classes} but {config.data.path} "
                              f"has {len(classes)} classes")
        self.classes = classes or [f"class_{i}" for i in range(self.model_raw.num_classes)]
        model_config = self.model_raw.config
        in_chans = model_config.in_chans
        self.preprocess = Preprocess(model_config.img_size, in_chans,
                                     _channel_values(config.data.mean or model_config.mean, in_chans, "mean"),
                                     _channel_values(config.data.std or model_config.std, in_chans, "std"),
                                     config.data.crop_pct, config.data.interpolation)
        self._resolve_config()
        self._build_loaders(train_base, val_base)
        self._build_model_and_optimizer()
        self.best = {"top1": -1.0, "epoch": None, "step": None, "weights": None}
        self.position = {"epoch": 0, "micro_step": 0, "global_step": 0}
        # Running sums behind the logged losses; checkpointed so a resumed run logs the same numbers.
        self.window = {"loss": 0.0, "micro": 0, "skipped": 0, "images": 0, "time": time.perf_counter()}
        self.epoch_loss = {"loss": 0.0, "micro": 0}
        if resume is not None:
            self._restore(resume)
        else:
            seed_everything(cfg_train.seed + env.rank)  # per-rank stream for mixup and drop path
        self._open_logs(resume is not None)

    # ------------------------------------------------------------------ setup
    def _resume_state(self) -> dict | None:
        ckpt = self.out / "last.ckpt"
        if not self.config.train.resume:
            if ckpt.exists():
                raise ConfigError(f"{self.out} already holds a run ({ckpt}); pass --resume to continue it "
                                  "or choose another --output")
            return None
        if not ckpt.exists():
            if self.env.is_main:
                log.warning("--resume: %s has no last.ckpt yet; starting from scratch", self.out)
            return None
        return load_train_state(ckpt)

    def _datasets(self):
        data = self.config.data
        if data.synthetic:
            return None, None, None
        train_base = ImageFolderDataset(resolve_split(data.path, data.train_split))
        val_base = ImageFolderDataset(resolve_split(data.path, data.val_split)) if data.val_split else None
        if val_base is not None and val_base.classes != train_base.classes:
            raise DataError(f"{val_base.root} has classes {val_base.classes[:5]}... but {train_base.root} has "
                            f"{train_base.classes[:5]}...; both splits need the same class folders")
        return train_base.classes, train_base, val_base

    def _resolve_config(self) -> None:
        """Write back what was left to defaults, so config.yaml says what actually ran."""
        model, pre = self.config.model, self.preprocess
        model.num_classes = self.model_raw.num_classes
        model.img_size = pre.img_size[0] if pre.img_size[0] == pre.img_size[1] else None
        model.in_chans = pre.in_chans
        model.drop_path_rate = self.model_raw.config.drop_path_rate
        self.config.data.mean, self.config.data.std = list(pre.mean), list(pre.std)

    def _build_loaders(self, train_base, val_base) -> None:
        cfg, env, pre = self.config, self.env, self.preprocess
        data, aug, seed = cfg.data, cfg.augment, cfg.train.seed
        augment = aug.enabled
        workers = data.workers
        self.train_failures, self.val_failures = train_base, val_base  # image folders count unreadable files
        if data.synthetic:
            train_base = SyntheticDataset(data.synthetic_train_size, self.model_raw.num_classes, pre.img_size,
                                          pre.in_chans, seed=seed)
            val_base = SyntheticDataset(data.synthetic_val_size, self.model_raw.num_classes, pre.img_size,
                                        pre.in_chans, seed=seed + 1_000_003) if data.val_split else None
        self.sampler = GlobalBatchSampler(len(train_base), cfg.train.batch_size, env.world_size, env.rank, seed,
                                          cfg.optim.accumulation_steps)
        pin = self.device.type == "cuda"
        if data.cache and not data.synthetic:
            started = time.perf_counter()
            for dataset in (train_base, val_base):
                if dataset is not None:
                    dataset.in_chans = pre.in_chans
            train_cache = CachedSplit.decode(train_base, pre.img_size, crop_pct=1.0, interpolation=pre.interpolation,
                                             workers=workers)
            self.train_loader = CachedTrainLoader(train_cache, self.sampler, pre.mean, pre.std, augment=augment,
                                                  seed=seed, padding=aug.crop_padding, hflip=aug.hflip)
            if val_base is not None:
                val_cache = CachedSplit.decode(val_base, pre.img_size, crop_pct=pre.crop_pct,
                                               interpolation=pre.interpolation, workers=workers)
                self.val_loader = CachedEvalLoader(val_cache, shard_indices(len(val_cache), env.world_size, env.rank),
                                                   cfg.train.batch_size, pre.mean, pre.std)
            else:
                self.val_loader = None
            if env.is_main:
                log.info("decoded %d + %d images into memory in %.1f s", len(train_cache),
                         len(val_base) if val_base is not None else 0, time.perf_counter() - started)
            self._check_bad_data()
        else:
            train_transform = val_transform = None
            if not data.synthetic:
                for dataset in (train_base, val_base):
                    if dataset is not None:
                        dataset.in_chans = pre.in_chans
                train_transform = build_train_transform(
                    pre.img_size, pre.mean, pre.std, in_chans=pre.in_chans, augment=augment, scale=tuple(aug.scale),
                    hflip=aug.hflip, rand_augment=aug.rand_augment, random_erasing=aug.random_erasing,
                    interpolation=pre.interpolation)
                val_transform = build_eval_transform(pre.img_size, pre.mean, pre.std, crop_pct=pre.crop_pct,
                                                     interpolation=pre.interpolation, in_chans=pre.in_chans)
            self.train_loader = DataLoader(
                SeededTransformDataset(train_base, train_transform, seed), batch_sampler=self.sampler,
                num_workers=workers, pin_memory=pin, persistent_workers=workers > 0, generator=torch.Generator())
            self.val_loader = None if val_base is None else DataLoader(
                SeededTransformDataset(val_base, val_transform), batch_size=cfg.train.batch_size,
                sampler=shard_indices(len(val_base), env.world_size, env.rank), num_workers=workers,
                pin_memory=pin, generator=torch.Generator())
        mixing = augment and (aug.mixup > 0 or aug.cutmix > 0) and aug.mix_prob > 0
        self.mix = build_mixup_cutmix(self.model_raw.num_classes, aug.mixup, aug.cutmix, aug.mix_prob,
                                      aug.switch_prob, aug.label_smoothing) if mixing else None

    def _build_model_and_optimizer(self) -> None:
        cfg, env = self.config, self.env
        model = self.model_raw
        if cfg.model.grad_checkpointing and cfg.model.memory_budget:
            raise ConfigError("model.grad_checkpointing and model.memory_budget exclude each other: "
                              "the budget picks the recomputation itself")
        if cfg.model.grad_checkpointing:
            model.set_grad_checkpointing(True)
        model.to(self.device)
        if cfg.model.memory_budget:
            from .memory import apply_memory_budget
            try:
                apply_memory_budget(model, cfg.train.batch_size, cfg.model.memory_budget,
                                    img_size=self.preprocess.img_size, in_chans=self.preprocess.in_chans,
                                    precision=cfg.train.precision, ema=cfg.train.ema,
                                    log=log.info if env.is_main else None)
            except ValueError as error:
                raise ConfigError(f"model.memory_budget: {error}") from None
        self.fsdp = env.distributed and cfg.train.strategy == "fsdp"
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard
            for block in model.blocks():
                fully_shard(block)
            fully_shard(model)
        self.ema = ModelEma(model, cfg.train.ema_decay) if cfg.train.ema else None
        runnable: nn.Module = torch.compile(model) if cfg.train.compile else model
        if env.distributed and not self.fsdp:
            runnable = DistributedDataParallel(runnable, device_ids=[self.device.index] if self.device.type == "cuda"
                                               else None, broadcast_buffers=False)
        self.model = runnable

        optim, schedule = cfg.optim, cfg.schedule
        self.optimizer = build_optimizer(model, lr=optim.lr, weight_decay=optim.weight_decay, betas=optim.betas,
                                         eps=optim.eps)
        self.images_per_step = self.sampler.global_batch * optim.accumulation_steps
        peak, warmup_lr, min_lr = scaled_lrs(optim.lr, schedule.warmup_lr, schedule.min_lr, self.images_per_step,
                                             optim.lr_reference_batch, optim.scale_lr)
        self.steps_per_epoch = self.sampler.steps_per_epoch // optim.accumulation_steps
        self.total_steps = schedule.epochs * self.steps_per_epoch
        if schedule.max_steps is not None:
            self.total_steps = min(self.total_steps, schedule.max_steps)
        warmup_steps = round(schedule.warmup_epochs * self.steps_per_epoch)
        self.schedule = WarmupCosineSchedule(self.optimizer, peak, warmup_lr, min_lr, warmup_steps, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.precision == "fp16-mixed")
        if env.is_main:
            log.info("%s: %.2fM params, %d steps (%d per epoch), %d images per step, peak lr %.3g",
                     model.name or "model", model.num_params() / 1e6, self.total_steps, self.steps_per_epoch,
                     self.images_per_step, peak)

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
    def _model_state(self, module: nn.Module) -> dict:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}

    def _optimizer_state(self) -> dict:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
            return get_optimizer_state_dict(self.model_raw, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def _weights_metadata(self, source: str) -> dict:
        return {META_CLASSES: json.dumps(self.classes), **self.preprocess.to_metadata(),
                "swinkit_weights": source, "swinkit_step": str(self.position["global_step"])}

    def _write_weights(self, state: dict, path: Path, source: str) -> None:
        if self.fsdp:  # the full state was gathered on rank 0; a plain CPU copy of the model writes it
            from ..api import model_metadata
            from ..weights.io import write_safetensors
            write_safetensors(state, path, model_metadata(self.model_raw, self._weights_metadata(source)))
        else:
            module = self.ema.module if source == "ema" else self.model_raw
            save_weights(module, path, metadata=self._weights_metadata(source))

    def _save(self) -> None:
        """last.safetensors + last.ckpt at the current position (all ranks call; rank 0 writes)."""
        rng = distributed.all_gather_objects(capture_rng(), self.env)
        running = distributed.all_gather_objects({
            "window_loss": float(self.window["loss"]), "window_micro": self.window["micro"],
            "window_skipped": self.window["skipped"], "epoch_loss": float(self.epoch_loss["loss"]),
            "epoch_micro": self.epoch_loss["micro"]}, self.env)
        model_state, optimizer_state = self._model_state(self.model_raw), self._optimizer_state()
        if self.env.is_main:
            self._write_weights(model_state, self.out / "last.safetensors", "model")
            save_train_state({
                "model": model_state, "optimizer": optimizer_state, "scheduler": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "rng": rng, "position": dict(self.position), "best": dict(self.best),
                "running": running,
                "world_size": self.env.world_size, "global_batch": self.sampler.global_batch,
                "config": self.config.to_dict(),
            }, self.out / "last.ckpt")
        distributed.barrier(self.env)

    def _restore(self, state: dict) -> None:
        if state["global_batch"] != self.sampler.global_batch:
            raise CheckpointError(f"{self.out / 'last.ckpt'} was trained with a global batch of {state['global_batch']} "
                                  f"images per micro-step; this run has {self.sampler.global_batch} "
                                  "(batch_size x processes must match to resume)")
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            set_model_state_dict(self.model_raw, state["model"], options=options)
            set_optimizer_state_dict(self.model_raw, self.optimizer, state["optimizer"], options=options)
        else:
            self.model_raw.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        if state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.position = dict(state["position"])
        self.best = dict(state["best"])
        runnings = state.get("running") or []
        if runnings:
            running = runnings[self.env.rank if self.env.rank < len(runnings) else 0]
            self.window.update(loss=running["window_loss"], micro=running["window_micro"],
                               skipped=running["window_skipped"])
            self.epoch_loss = {"loss": running["epoch_loss"], "micro": running["epoch_micro"]}
        rng = state["rng"]
        restore_rng(rng[self.env.rank] if self.env.rank < len(rng) else rng[0])
        if self.env.is_main:
            print(f"resumed {self.out} at epoch {self.position['epoch'] + 1}, step {self.position['global_step']}",
                  flush=True)

    # ------------------------------------------------------------------ data health
    def _check_bad_data(self) -> None:
        """Count unreadable images over all ranks; too many -> DataError (raised on every rank)."""
        datasets = [(self.train_failures, "train"), (self.val_failures, "val")]
        counts = distributed.all_reduce_sum([float(d.num_failed) if d is not None else 0.0 for d, _ in datasets],
                                            self.env)
        self.bad_images = int(sum(counts))
        for (dataset, _), failed in zip(datasets, counts):
            if dataset is not None and failed > self.config.data.max_bad_fraction * len(dataset):
                names = dataset.failed_paths()
                shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                raise DataError(f"{int(failed)} of {len(dataset)} images under {dataset.root} could not be read "
                                f"(more than {self.config.data.max_bad_fraction:.0%}): {shown}")

    def _report_bad_data(self) -> None:
        if not self.env.is_main:
            return
        names = [p for d in (self.train_failures, self.val_failures) if d is not None for p in d.failed_paths()]
        if names and names != getattr(self, "_reported_bad", None):
            log.warning("skipped %d unreadable image(s) so far: %s", len(names), ", ".join(names[:10]))
            self._reported_bad = names

    # ------------------------------------------------------------------ the loop
    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if targets.ndim == 2:  # soft targets from mixup/cutmix, smoothing included
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, targets, label_smoothing=self.config.augment.label_smoothing)

    def _micro_step(self, images, labels, sync: bool) -> torch.Tensor:
        if self.mix is not None:
            images, targets = self.mix(images, labels)
        else:
            targets = torch.as_tensor(labels).long()
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        no_sync = (not sync and isinstance(self.model, DistributedDataParallel))
        with self.model.no_sync() if no_sync else contextlib.nullcontext():
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                logits = self.model(images)
            loss = self._loss(logits, targets)
            self.scaler.scale(loss / self.config.optim.accumulation_steps).backward()
        return loss.detach()

    def _optimizer_step(self) -> bool:
        """Clip, step, update EMA; returns False when the step was skipped (non-finite gradients)."""
        self.scaler.unscale_(self.optimizer)
        clip = self.config.optim.clip_grad
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model_raw.parameters(), clip if clip else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a sharded DTensor
            grad_norm = grad_norm.full_tensor()
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

    def fit(self) -> dict:
        cfg, env = self.config, self.env
        accumulation = cfg.optim.accumulation_steps
        save_every, log_every = cfg.train.save_every, cfg.train.log_every
        if self.position["global_step"] >= self.total_steps:
            if env.is_main:
                log.warning("%s: the run is already complete (%d steps)", self.out, self.total_steps)
            return self._finish(None)
        self.bad_images = 0
        started = time.perf_counter()
        last_eval = None
        window = self.window
        window.update(images=0, time=time.perf_counter())
        epoch = self.position["epoch"]
        while self.position["global_step"] < self.total_steps:
            epoch = self.position["epoch"]
            self.sampler.set_position(epoch, self.position["micro_step"])
            self.model.train()
            epoch_started = time.perf_counter()
            bar = self._progress_bar(epoch)
            micro_in_step = 0
            for images, labels in self.train_loader:
                micro_in_step += 1
                loss = self._micro_step(images, labels, sync=micro_in_step == accumulation)
                window["loss"] += loss  # stays on the device: no sync per micro-step
                window["micro"] += 1
                window["images"] += labels.shape[0] * env.world_size
                self.epoch_loss["loss"] += loss
                self.epoch_loss["micro"] += 1
                if micro_in_step < accumulation:
                    continue
                micro_in_step = 0
                if not self._optimizer_step():
                    window["skipped"] += 1
                self.schedule.step()
                self.position["global_step"] += 1
                self.position["micro_step"] += accumulation
                step = self.position["global_step"]
                if bar is not None:
                    bar.update(1)
                if step % log_every == 0 or step == self.total_steps:
                    self._log_step(window, bar)
                    self._check_bad_data()
                if step >= self.total_steps:
                    break
                if save_every and step % save_every == 0 and self.position["micro_step"] < self.sampler.steps_per_epoch:
                    self._save()
            if bar is not None:
                bar.close()
            finished_epoch = self.position["micro_step"] >= self.sampler.steps_per_epoch
            if finished_epoch:
                self.position["epoch"] += 1
                self.position["micro_step"] = 0
            epoch_loss = distributed.all_reduce_sum([float(self.epoch_loss["loss"]), self.epoch_loss["micro"]], env)
            if finished_epoch:
                self.epoch_loss = {"loss": 0.0, "micro": 0}
            last_eval = self._end_of_epoch(epoch, epoch_loss[0] / max(epoch_loss[1], 1),
                                           time.perf_counter() - epoch_started)
            self._save()
        result = self._finish(last_eval)
        result["train_seconds"] = time.perf_counter() - started
        return result

    def _progress_bar(self, epoch: int):
        if not (self.env.is_main and progress_enabled(self.config.output.progress)):
            return None
        from tqdm import tqdm
        done = self.position["micro_step"] // self.config.optim.accumulation_steps
        return tqdm(total=self.steps_per_epoch, initial=done, desc=f"epoch {epoch + 1}/{self.config.schedule.epochs}",
                    unit="step", dynamic_ncols=True, leave=False)

    def _log_step(self, window: dict, bar) -> None:
        loss_sum, micro, skipped = distributed.all_reduce_sum([float(window["loss"]), window["micro"], window["skipped"]],
                                                              self.env)
        elapsed = time.perf_counter() - window["time"]
        record = {"step": self.position["global_step"], "epoch": self.position["epoch"],
                  "loss": loss_sum / max(micro, 1), "lr": self.schedule.optimizer.param_groups[0]["lr"],
                  "img_per_s": window["images"] / elapsed if elapsed > 0 else None, "grad_norm": float(self.grad_norm)}
        if skipped:
            record["skipped_steps"] = int(skipped)
            if self.env.is_main:
                log.warning("step %d: %d optimizer step(s) skipped for non-finite gradients", record["step"],
                            int(skipped))
        if self.scaler.is_enabled():
            record["loss_scale"] = self.scaler.get_scale()
        window.update(loss=0.0, micro=0, images=0, time=time.perf_counter(), skipped=0)
        if not self.env.is_main:
            return
        self.metrics.write(record)
        self.tensorboard.scalars({"train/loss": record["loss"], "train/lr": record["lr"],
                                  "train/img_per_s": record["img_per_s"] or 0.0,
                                  "train/grad_norm": record["grad_norm"]}, record["step"])
        if bar is not None:
            bar.set_postfix(step=record["step"], loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                            img_s=f"{record['img_per_s'] or 0:.0f}")

    def _evaluate(self, module: nn.Module) -> dict:
        counts = evaluate_model(module, self.val_loader, self.device, amp_dtype=self.amp_dtype)
        keys = ("images", "correct_top1", "correct_top5", "loss_sum")
        totals = distributed.all_reduce_sum([counts[k] for k in keys], self.env)
        return summarize({k: (int(v) if k != "loss_sum" else v) for k, v in zip(keys, totals)})

    def _end_of_epoch(self, epoch: int, train_loss: float, seconds: float) -> dict | None:
        """Validate (model and EMA), keep best.safetensors, record the epoch."""
        record = {"step": self.position["global_step"], "epoch": epoch + 1, "train_loss": train_loss,
                  "epoch_time_s": seconds}
        result = None
        if self.val_loader is not None:
            result = self._evaluate(self.model_raw)
            record.update(val_top1=result["top1"], val_top5=result["top5"], val_loss=result["loss"],
                          val_images=result["images"])
            candidates = [("model", result["top1"])]
            if self.ema is not None:
                ema = self._evaluate(self.ema.module)
                record.update(ema_val_top1=ema["top1"], ema_val_top5=ema["top5"])
                candidates.append(("ema", ema["top1"]))
            source, top1 = max(candidates, key=lambda item: item[1])
            if top1 > self.best["top1"]:
                self.best = {"top1": top1, "epoch": epoch + 1, "step": self.position["global_step"], "weights": source}
                state = self._model_state(self.model_raw) if self.fsdp else None
                if self.env.is_main:
                    self._write_weights(state, self.out / "best.safetensors", source)
        self._check_bad_data()
        self._report_bad_data()
        record["bad_images"] = self.bad_images
        if self.env.is_main:
            self.metrics.write(record)
            self.tensorboard.scalars({"val/top1": record.get("val_top1"), "val/top5": record.get("val_top5"),
                                      "val/loss": record.get("val_loss"), "train/epoch_loss": train_loss,
                                      "val/ema_top1": record.get("ema_val_top1")}, record["step"])
            if self.config.output.curves:
                plot_curves(self.metrics.records, self.out / "curves.png")
            summary = f"epoch {epoch + 1}/{self.config.schedule.epochs} step {record['step']}/{self.total_steps} " \
                      f"train loss {train_loss:.4f}"
            if result is not None:
                summary += f"  val top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}%"
            print(f"{summary}  ({seconds:.1f} s)", flush=True)
        return result

    def _finish(self, last_eval: dict | None) -> dict:
        if self.env.is_main:
            self.metrics.close()
            self.tensorboard.close()
        return {"output": str(self.out), "steps": self.position["global_step"], "best_top1": self.best["top1"],
                "val": last_eval}
