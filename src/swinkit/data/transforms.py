"""Train / eval transforms and batch MixUp-CutMix, on torchvision.transforms.v2.

The train recipe is the official Swin one (timm `create_transform` with the Swin config):
RandomResizedCrop(scale 0.08-1, bicubic) -> horizontal flip -> RandAugment(m9, n2) ->
tensor + normalise -> RandomErasing(p=0.25, per-pixel random values); MixUp 0.8 / CutMix
1.0 with switch prob 0.5 and label smoothing 0.1 on the batch. Eval resizes the shorter
side to size / crop_pct (256 for 224) and centre-crops.

Every transform takes a PIL image (as `ImageFolderDataset` yields) and returns a float
tensor [in_chans, H, W]. Grayscale data works for both model widths: the first step makes
the image RGB for `in_chans=3` (gray copied to three channels) or L for `in_chans=1`; an
RGB mean/std is averaged to one value when `in_chans=1`.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

import torch
from torch.nn.functional import one_hot
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The official eval transform: resize to size / 0.875 (256 for 224), bicubic, centre crop.
OFFICIAL_CROP_PCT = 0.875
OFFICIAL_INTERPOLATION = "bicubic"
_RAND_AUGMENT_MAX_MAGNITUDE = 10  # timm's scale: m0..m10 spans an op's whole range


def _interpolation(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name.lower())
    except ValueError:
        choices = ", ".join(mode.value for mode in InterpolationMode)
        raise ValueError(f"unknown interpolation {name!r}; choose one of {choices}") from None


def channel_stats(values: Sequence[float], in_chans: int, what: str) -> tuple[float, ...]:
    """Per-channel mean or std for `in_chans` channels (an RGB triple averages to one value)."""
    values = tuple(float(v) for v in values)
    if len(values) == in_chans:
        return values
    if len(values) == 1:
        return values * in_chans
    if in_chans == 1:
        return (sum(values) / len(values),)
    raise ValueError(f"{what} has {len(values)} values but the model takes {in_chans} channels")


def _channel_step(in_chans: int) -> v2.Transform:
    """Make the image L (in_chans=1) or RGB (in_chans=3) before anything else sees it."""
    if in_chans == 1:
        return v2.Grayscale(num_output_channels=1)
    if in_chans == 3:
        return v2.RGB()
    raise ValueError(f"image transforms support in_chans 1 or 3, not {in_chans}")


def _to_normalized_tensor(mean: tuple[float, ...], std: tuple[float, ...]) -> list[v2.Transform]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def parse_rand_augment(spec: str) -> tuple[int, int]:
    """timm-style 'rand-m9-mstd0.5-inc1' -> (num_ops n, magnitude m); defaults n=2, m=9.

    Only m and n are used; timm's other knobs (mstd, inc, mmax, w, p) are ignored, since
    torchvision's RandAugment has a fixed magnitude and its own op set.
    """
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment spec {spec!r} must start with 'rand-'")
    num_ops, magnitude = 2, 9
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)([0-9.]*)", part)
        if match is None:
            raise ValueError(f"cannot parse {part!r} in RandAugment spec {spec!r}")
        key, value = match.groups()
        try:
            if key == "m":
                magnitude = int(float(value))
            elif key == "n":
                num_ops = int(value)
            else:
                logger.debug("RandAugment spec %r: ignoring %r", spec, part)
        except ValueError:
            raise ValueError(f"cannot parse {part!r} in RandAugment spec {spec!r}") from None
    if not 0 <= magnitude <= _RAND_AUGMENT_MAX_MAGNITUDE:
        raise ValueError(f"RandAugment magnitude {magnitude} in {spec!r} is outside 0..{_RAND_AUGMENT_MAX_MAGNITUDE}")
    return num_ops, magnitude


def build_train_transform(
    img_size: int | tuple[int, int],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    in_chans: int = 3,
    augment: bool = True,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    rand_augment: str | None = "rand-m9-mstd0.5-inc1",
    random_erasing: float = 0.25,
    interpolation: str = "bicubic",
) -> v2.Compose:
    """PIL image -> augmented, normalised tensor [in_chans, H, W] (official Swin recipe).

    `augment=False` gives resize + centre crop + normalise (no randomness).
    """
    mean, std = channel_stats(mean, in_chans, "mean"), channel_stats(std, in_chans, "std")
    mode = _interpolation(interpolation)
    steps: list[v2.Transform] = [_channel_step(in_chans)]
    if not augment:
        steps += [v2.Resize(img_size, interpolation=mode, antialias=True), v2.CenterCrop(img_size)]
        return v2.Compose(steps + _to_normalized_tensor(mean, std))

    steps.append(v2.RandomResizedCrop(img_size, scale=scale, interpolation=mode, antialias=True))
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if rand_augment:
        num_ops, magnitude = parse_rand_augment(rand_augment)
        fill = [round(255 * value) for value in mean]  # pixels uncovered by geometric ops get the mean, as timm does
        steps.append(
            v2.RandAugment(
                num_ops=num_ops,
                magnitude=magnitude,
                num_magnitude_bins=_RAND_AUGMENT_MAX_MAGNITUDE + 1,
                interpolation=mode,
                fill=fill,
            )
        )
    steps += _to_normalized_tensor(mean, std)
    if random_erasing > 0:
        steps.append(v2.RandomErasing(p=random_erasing, value="random"))  # timm's 'pixel' mode
    return v2.Compose(steps)


def build_eval_transform(
    img_size: int | tuple[int, int],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    crop_pct: float = OFFICIAL_CROP_PCT,
    interpolation: str = OFFICIAL_INTERPOLATION,
    in_chans: int = 3,
) -> v2.Compose:
    """PIL image -> normalised tensor [in_chans, H, W]: resize to size / crop_pct, centre crop."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    mean, std = channel_stats(mean, in_chans, "mean"), channel_stats(std, in_chans, "std")
    if isinstance(img_size, int):
        resize: int | list[int] = math.floor(img_size / crop_pct)  # shorter side; keeps aspect
    else:
        resize = [math.floor(side / crop_pct) for side in img_size]
    steps = [
        _channel_step(in_chans),
        v2.Resize(resize, interpolation=_interpolation(interpolation), antialias=True),
        v2.CenterCrop(img_size),
    ]
    return v2.Compose(steps + _to_normalized_tensor(mean, std))


class MixupCutmix:
    """Batch transform: (images [B, C, H, W], labels [B] int) -> (images, soft targets [B, K]).

    Per batch: with probability `prob` apply MixUp or CutMix (CutMix with `switch_prob`),
    otherwise leave the images; then smooth the (mixed) one-hot targets,
    targets * (1 - eps) + eps / K. Randomness comes only from torch's global CPU RNG, so
    a resumed run that restores that state reproduces the same mixes.
    """

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float, prob: float, switch_prob: float, label_smoothing: float):
        self.num_classes = num_classes
        self.prob = prob
        self.label_smoothing = label_smoothing
        choices, weights = [], []
        if mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
            weights.append(1.0 - switch_prob if cutmix_alpha > 0 else 1.0)
        if cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
            weights.append(switch_prob if mixup_alpha > 0 else 1.0)
        if len(choices) > 1:
            self.mix = v2.RandomChoice(choices, p=weights)
        else:
            self.mix = choices[0] if choices else None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = labels.long()
        if self.mix is not None and (self.prob >= 1.0 or float(torch.rand(())) < self.prob):
            images, targets = self.mix(images, labels)
        else:
            targets = one_hot(labels, self.num_classes).float()
        eps = self.label_smoothing
        return images, targets * (1.0 - eps) + eps / self.num_classes


def build_mixup_cutmix(
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
) -> MixupCutmix:
    """MixUp/CutMix + label smoothing for training batches; see `MixupCutmix`."""
    return MixupCutmix(num_classes, mixup_alpha, cutmix_alpha, prob, switch_prob, label_smoothing)
