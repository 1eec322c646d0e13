"""What a run optimises. The trainer's loop (data order, accumulation, AMP, clipping, schedule,
checkpoints, resume, DDP/FSDP, logs) is the same for every objective; an objective says

    wrap(backbone)               the module trained around the Swin backbone
    batch_loss(images, labels)   one micro-batch's loss (forward under the run's autocast)
    validate(epoch, record)      end-of-epoch evaluation into the metrics record, its files
    summary(result)              the epoch line's tail

- `Classification`: labels -> cross-entropy (soft targets from mixup/cutmix), top-1/top-5 on the
  val split, best.safetensors (model or EMA, whichever is better).
- `SimMIMPretraining` (`pretrain.method: simmim`): labels are ignored; random masks per batch
  (drawn from the run's checkpointed RNG, so resume is exact) -> masked L1 reconstruction; the val
  split's reconstruction loss on fixed masks; every epoch `encoder.safetensors` (the backbone alone,
  for `swinkit train --pretrained`) and `reconstructions/epoch_NNN.png`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..files import atomic_write
from ..models.simmim import SimMIM, pixel_mask, random_mask
from ..models.swin import SwinTransformer
from . import distributed
from .evaluate import evaluate_model, summarize

log = logging.getLogger("swinkit.train")


def build_objective(trainer) -> Classification | SimMIMPretraining:
    method = trainer.config.pretrain.method
    return SimMIMPretraining(trainer) if method == "simmim" else Classification(trainer)


class Classification:
    labelled = True

    def __init__(self, trainer):
        self.trainer = trainer

    def wrap(self, backbone: SwinTransformer) -> nn.Module:
        return backbone

    def batch_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = self.trainer
        if t.data.mix is not None:
            images, targets = t.data.mix(images, labels)
        else:
            targets = torch.as_tensor(labels).long()
        images = images.to(t.device, non_blocking=True)
        targets = targets.to(t.device, non_blocking=True)
        with torch.autocast(t.device.type, dtype=t.amp_dtype, enabled=t.amp_dtype is not None):
            logits = t.model(images)
        logits = logits.float()
        if targets.ndim == 2:  # soft targets from mixup/cutmix, smoothing included
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, targets, label_smoothing=t.config.augment.label_smoothing)

    def validate(self, epoch: int, record: dict) -> dict:
        """Evaluate the model (and its EMA) into `record`; a new best top-1 -> best.safetensors."""
        t = self.trainer
        result = self._evaluate(t.model_raw)
        record.update(val_top1=result["top1"], val_top5=result["top5"], val_loss=result["loss"],
                      val_images=result["images"])
        candidates = [("model", result["top1"])]
        if t.ema is not None:
            ema = self._evaluate(t.ema.module)
            record.update(ema_val_top1=ema["top1"], ema_val_top5=ema["top5"])
            candidates.append(("ema", ema["top1"]))
        source, top1 = max(candidates, key=lambda item: item[1])
        if top1 > t.best["top1"]:
            t.best = {"top1": top1, "epoch": epoch + 1, "step": t.position["global_step"], "weights": source}
            state = distributed.model_state(t.model_raw, sharded=True) if t.fsdp else None
            if t.env.is_main:
                t._write_weights(state, t.out / "best.safetensors", source)
        return result

    def _evaluate(self, module: nn.Module) -> dict:
        t = self.trainer
        counts = evaluate_model(module, t.data.val_loader, t.device, amp_dtype=t.amp_dtype)
        keys = ("images", "correct_top1", "correct_top5", "loss_sum")
        totals = distributed.all_reduce_sum([counts[k] for k in keys], t.env)
        return summarize({k: (int(v) if k != "loss_sum" else v) for k, v in zip(keys, totals)})

    def summary(self, result: dict) -> str:
        return f"  val top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}%"

    def end_of_epoch(self, epoch: int) -> None:
        """Files written at every epoch end whatever the validation (none for a classifier)."""


class SimMIMPretraining:
    labelled = False
    VAL_MASK_SEED = 0x51A1  # the val split's masks: the same at every epoch, on any number of processes

    def __init__(self, trainer):
        self.trainer = trainer
        self.section = trainer.config.pretrain

    def wrap(self, backbone: SwinTransformer) -> nn.Module:
        """SimMIM around the backbone; `model.pretrained` also restores a SimMIM file's token and decoder."""
        model = SimMIM(backbone)
        if self.section.mask_patch_size % model.patch_size:  # refused before the run folder is touched
            from .config import ConfigError
            raise ConfigError(f"config key 'pretrain.mask_patch_size' ({self.section.mask_patch_size} px) must be "
                              f"a multiple of the model's patch size ({model.patch_size} px)")
        if self.trainer.config.model.pretrained is not None:
            from ..api import load_pretraining
            load_pretraining(model, self.trainer.config.model.pretrained)
        return model

    def masks(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """`[B, H/p, W/p]` random masks for a batch (CPU; the global RNG unless `generator`)."""
        model: SimMIM = self.trainer.model_raw
        grid = model.mask_grid(images.shape[2], images.shape[3])
        return random_mask(images.shape[0], grid, model.patch_size, self.section.mask_patch_size,
                           self.section.mask_ratio, generator)

    def batch_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = self.trainer
        mask = self.masks(images)
        images = images.to(t.device, non_blocking=True)
        mask = mask.to(t.device, non_blocking=True)
        with torch.autocast(t.device.type, dtype=t.amp_dtype, enabled=t.amp_dtype is not None):
            loss, _ = t.model(images, mask)
        return loss

    @torch.no_grad()
    def validate(self, epoch: int, record: dict) -> dict:
        """The reconstruction loss over this rank's share of the val split, masks drawn per batch by a
        generator seeded once per validation (comparable across epochs), summed over ranks."""
        t = self.trainer
        model = t.model_raw
        was_training = model.training
        model.eval()
        generator = torch.Generator().manual_seed(self.VAL_MASK_SEED + t.env.rank)
        loss_sum, images_seen = 0.0, 0
        try:
            for images, _ in t.data.val_loader:
                mask = self.masks(images, generator).to(t.device)
                images = images.to(t.device, non_blocking=True)
                with torch.autocast(t.device.type, dtype=t.amp_dtype, enabled=t.amp_dtype is not None):
                    loss, _ = model(images, mask)
                loss_sum += float(loss) * images.shape[0]
                images_seen += images.shape[0]
        finally:
            model.train(was_training)
        loss_sum, images_seen = distributed.all_reduce_sum([loss_sum, images_seen], t.env)
        result = {"loss": loss_sum / images_seen if images_seen else float("nan"), "images": int(images_seen)}
        record.update(val_loss=result["loss"], val_images=result["images"])
        return result

    def summary(self, result: dict) -> str:
        return f"  val reconstruction loss {result['loss']:.4f}"

    def end_of_epoch(self, epoch: int) -> None:
        """encoder.safetensors (every rank takes part under FSDP) and, on rank 0, the preview grid."""
        t = self.trainer
        state = distributed.model_state(t.model_raw, sharded=True) if t.fsdp else None
        if not t.env.is_main:
            return
        t._write_encoder(state, t.out / "encoder.safetensors")
        if self.section.preview_images and t.data.val_loader is not None:
            self.write_preview(t.out / "reconstructions" / f"epoch_{epoch + 1:03d}.png")

    @torch.no_grad()
    def write_preview(self, path: Path) -> Path | None:
        """A PNG grid for the first `preview_images` val images (fixed masks): rows of originals, masked
        inputs (masked pixels grey) and reconstructions (masked pixels from the model, the rest as input)."""
        from torchvision.utils import make_grid, save_image
        t = self.trainer
        images = _first_images(t.data.val_loader, self.section.preview_images)
        if images is None:
            return None
        model = t.model_raw
        was_training = model.training
        model.eval()
        try:
            mask = self.masks(images, torch.Generator().manual_seed(self.VAL_MASK_SEED))
            _, reconstruction = model(images.to(t.device), mask.to(t.device))
        finally:
            model.train(was_training)
        pixels = pixel_mask(mask, model.patch_size, images.shape[2], images.shape[3])
        mean = torch.tensor(t.preprocess.mean).view(1, -1, 1, 1)
        std = torch.tensor(t.preprocess.std).view(1, -1, 1, 1)

        def to_pixels(x: torch.Tensor) -> torch.Tensor:
            return (x.float().cpu() * std + mean).clamp(0, 1)

        original = to_pixels(images)
        masked = original * (1 - pixels) + 0.5 * pixels
        filled = original * (1 - pixels) + to_pixels(reconstruction) * pixels
        rows = torch.cat([original, masked, filled])
        if rows.shape[-1] < 96:  # small images (Fashion-MNIST): enlarge without smoothing, so patches stay visible
            rows = F.interpolate(rows, scale_factor=96 // rows.shape[-1], mode="nearest")
        grid = make_grid(rows, nrow=len(images), padding=2, pad_value=1.0)
        return atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))


def _first_images(loader, count: int) -> torch.Tensor | None:
    taken = []
    for images, _ in loader:
        taken.append(images)
        if sum(len(x) for x in taken) >= count:
            break
    return torch.cat(taken)[:count] if taken else None
