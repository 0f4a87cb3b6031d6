"""Train/eval image transforms and Mixup/CutMix from timm, with the DeiT/Vim recipe as defaults."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, auto_augment, create_transform
from torch import Tensor
from torchvision import transforms

RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
EVAL_CROP_PCT = 0.875

ImageTransform = Callable[[Image.Image], Tensor]


@dataclass(frozen=True)
class Augment:
    """Training augmentation settings (the DeiT/Vim recipe by default), shared by every DataModule.

    ``crop_scale``: area fraction range of the random-resized crop; ``hflip``: horizontal flip probability;
    ``auto_augment``: a timm RandAugment/AutoAugment policy string or None; ``reprob``: random-erasing
    probability; ``color_jitter``: only acts without ``auto_augment`` (timm disables it under RandAugment,
    as the DeiT/Vim recipe ``--color-jitter 0.3 --aa rand-m9-mstd0.5-inc1`` does).
    """

    auto_augment: str | None = RAND_AUGMENT
    reprob: float = 0.25
    color_jitter: float = 0.3
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5


def train_transform(
    img_size: int = 224,
    augment: Augment = Augment(),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ImageTransform:
    """PIL image → normalised float tensor (3, img_size, img_size) with the training ``augment``: random-resized
    crop (bicubic), horizontal flip, RandAugment, random erasing (pixel mode). Mean/std default to ImageNet's."""
    transform = create_transform(
        input_size=img_size,
        is_training=True,
        scale=tuple(augment.crop_scale),
        hflip=augment.hflip,
        auto_augment=augment.auto_augment or None,
        color_jitter=augment.color_jitter,
        interpolation="bicubic",
        re_prob=augment.reprob,
        re_mode="pixel",
        re_count=1,
        mean=tuple(mean or IMAGENET_DEFAULT_MEAN),
        std=tuple(std or IMAGENET_DEFAULT_STD),
    )
    return allow_zero_bit_posterize(transform)


def posterize(image: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's posterize op, except that keeping 0 bits gives a black image, as Pillow < 13 did (Pillow 13
    raises ValueError). ``rand-...-inc1`` asks for 0 bits whenever the sampled magnitude reaches 10."""
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return auto_augment.posterize(image, bits_to_keep)


def allow_zero_bit_posterize(transform: transforms.Compose) -> transforms.Compose:
    """Swap ``posterize`` into the Posterize ops of the RandAugment/AutoAugment stages of ``transform``."""
    for stage in transform.transforms:
        if isinstance(stage, auto_augment.RandAugment):
            ops = stage.ops
        elif isinstance(stage, auto_augment.AutoAugment):
            ops = [op for sub_policy in stage.policy for op in sub_policy]
        else:
            continue
        for op in ops:
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize
    return transform


def eval_transform(
    img_size: int = 224,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_pct: float = EVAL_CROP_PCT,
) -> ImageTransform:
    """PIL image → float tensor (3, img_size, img_size): bicubic resize of the short side to
    ``int(img_size / crop_pct)``, center crop, normalise (ImageNet mean/std by default)."""
    return create_transform(
        input_size=img_size,
        is_training=False,
        interpolation="bicubic",
        crop_pct=crop_pct,
        mean=tuple(mean or IMAGENET_DEFAULT_MEAN),
        std=tuple(std or IMAGENET_DEFAULT_STD),
    )


def mixup_fn(
    num_classes: int,
    mixup: float = 0.8,
    cutmix: float = 1.0,
    label_smoothing: float = 0.1,
    prob: float = 1.0,
    switch_prob: float = 0.5,
) -> Mixup | None:
    """timm ``Mixup`` (batch mode) mapping ``(x (B,C,H,W), y (B,) int64)`` to ``(x, soft targets (B, num_classes))``;
    None when both alphas are 0. The batch size must be even."""
    if mixup <= 0 and cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=mixup,
        cutmix_alpha=cutmix,
        prob=prob,
        switch_prob=switch_prob,
        mode="batch",
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )


def mix(mixup: Mixup, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """timm ``Mixup`` on images B×C×H×W or clips B×C×T×H×W → (mixed x, soft targets B×num_classes).

    timm's CutMix boxes index the last two dims of a 4-d batch, so a clip is mixed as B×(C·T)×H×W:
    one λ and one box per clip, the same for all its frames.
    """
    if x.dim() == 5:
        b, c, t, h, w = x.shape
        mixed, targets = mixup(x.reshape(b, c * t, h, w), y)
        return mixed.reshape(b, c, t, h, w), targets
    return mixup(x, y)
