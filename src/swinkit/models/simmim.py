"""SimMIM masked-image pre-training around the one Swin backbone (v1 or v2).

    images [B, C, H, W], mask [B, H/p, W/p] (1 = masked, p the patch size)
      -> encoder.forward_features(images, mask)   the classifier's own backbone; masked patch
                                                   embeddings replaced by its mask token
      -> [B, h, w, F] last-stage map -> decoder: 1x1 conv to stride^2 * C, pixel shuffle
      -> reconstruction [B, C, H, W]              (cropped where H, W are not multiples of the stride)
      -> loss: mean L1 over the masked pixels, per channel (the official and Hugging Face loss)

The state dict is `encoder.*` (the backbone's native keys and `encoder.mask_token`) and
`decoder.0.*`, as the official SimMIM code names them; `weights/layouts.py` maps it to and from
the official and Hugging Face (`*ForMaskedImageModeling`) files.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .swin import SwinTransformer


def encoder_stride(encoder: SwinTransformer) -> int:
    """Input pixels per token of the last stage: patch size x 2 per patch merging (32 for Swin-T)."""
    return encoder.config.patch_size * 2 ** (encoder.config.num_stages - 1)


def random_mask(batch: int, grid: tuple[int, int], patch_size: int, mask_patch_size: int, mask_ratio: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """SimMIM's random masking: `[batch, *grid]` 0/1 float mask at the model's patch granularity.

    The image is cut into squares of `mask_patch_size` pixels (a multiple of the patch size); exactly
    `ceil(squares * mask_ratio)` of them are masked per image, chosen uniformly. Where the token grid
    is not a multiple of the square, the squares on the bottom/right edge are cut off.
    """
    if mask_patch_size % patch_size:
        raise ValueError(f"the mask patch size ({mask_patch_size} px) must be a multiple of the model's "
                         f"patch size ({patch_size} px)")
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"the mask ratio must be in (0, 1), got {mask_ratio}")
    scale = mask_patch_size // patch_size
    rows, cols = math.ceil(grid[0] / scale), math.ceil(grid[1] / scale)
    count = math.ceil(rows * cols * mask_ratio)
    ranks = torch.rand(batch, rows * cols, generator=generator).argsort(dim=1).argsort(dim=1)
    squares = (ranks < count).float().view(batch, rows, cols)
    mask = squares.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return mask[:, :grid[0], :grid[1]].contiguous()


def pixel_mask(mask: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """`[B, h, w]` patch mask -> `[B, 1, height, width]` pixel mask."""
    pixels = mask.repeat_interleave(patch_size, dim=1).repeat_interleave(patch_size, dim=2)
    return pixels[:, :height, :width].unsqueeze(1)


def masked_l1(images: torch.Tensor, reconstruction: torch.Tensor, mask: torch.Tensor, patch_size: int
              ) -> torch.Tensor:
    """Mean absolute error over masked pixels, averaged over channels (fp32):
    sum(|x - x_rec| * m) / (sum(m) + 1e-5) / C, `m` the pixel mask."""
    pixels = pixel_mask(mask, patch_size, images.shape[2], images.shape[3]).to(torch.float32)
    error = F.l1_loss(reconstruction.float(), images.float(), reduction="none")
    return (error * pixels).sum() / (pixels.sum() + 1e-5) / images.shape[1]


class SimMIM(nn.Module):
    """A Swin backbone with a mask token and a light decoder, trained to reconstruct masked pixels.

    forward(images `[B, C, H, W]`, mask `[B, H/p, W/p]`) -> (loss, reconstruction `[B, C, H, W]`).
    The backbone (`encoder`) is the classifier's own model with no head; after pre-training it is
    saved alone (`swinkit.save_weights(model.encoder, ...)`) and fine-tuned as a classifier.
    """

    def __init__(self, encoder: SwinTransformer):
        super().__init__()
        if encoder.num_classes:
            encoder.reset_classifier(0)
        encoder.add_mask_token()
        self.encoder = encoder
        self.stride = encoder_stride(encoder)
        in_chans = encoder.config.in_chans
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, self.stride ** 2 * in_chans, kernel_size=1),
            nn.PixelShuffle(self.stride))
        self.decoder.to(encoder.norm.weight.device)

    @property
    def config(self):
        return self.encoder.config

    @property
    def patch_size(self) -> int:
        return self.encoder.config.patch_size

    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`[B, C, H, W]` images, `[B, H/p, W/p]` mask -> `[B, C, H, W]` reconstruction."""
        features = self.encoder.forward_features(images, mask)
        reconstruction = self.decoder(features.permute(0, 3, 1, 2))
        return reconstruction[:, :, :images.shape[2], :images.shape[3]]

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reconstruction = self.reconstruct(images, mask)
        return masked_l1(images, reconstruction, mask, self.patch_size), reconstruction

    def blocks(self) -> list:
        return self.encoder.blocks()

    def no_weight_decay_keywords(self) -> tuple[str, ...]:
        return self.encoder.no_weight_decay_keywords()

    def mask_grid(self, height: int, width: int) -> tuple[int, int]:
        """The patch grid a mask for `height` x `width` images has."""
        p = self.patch_size
        return math.ceil(height / p), math.ceil(width / p)
