"""DomainBed's train augmentation and eval transform, with the backbone's normalisation.

Both start with :class:`ToRGB`, so a PIL image and an MNIST-style uint8 ``[C, H, W]`` tensor go
through the same pipeline; output is float32 ``[3, res, res]``. The resolution defaults to the
backbone's native one and can be overridden (the offline EfficientNet-Lite0 demo runs at 32-64 px).
"""
from __future__ import annotations

import torch
from PIL import Image
from torchvision import transforms as T

from linft.errors import ConfigError


class ToRGB:
    """PIL image or uint8 tensor ``[C, H, W]`` -> RGB PIL image.

    1 channel is replicated to 3 (grey); 2 channels (ColoredMNIST) become (red, green, 0); 3 are kept.
    """

    def __call__(self, x):
        if isinstance(x, Image.Image):
            return x if x.mode == "RGB" else x.convert("RGB")
        if not (isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.ndim == 3 and x.shape[0] in (1, 2, 3)):
            raise TypeError(f"expected a PIL image or a uint8 [C, H, W] tensor with C in 1..3, got {type(x)}")
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        elif x.shape[0] == 2:
            x = torch.cat([x, torch.zeros_like(x[:1])])
        return Image.fromarray(x.permute(1, 2, 0).contiguous().numpy(), "RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


def _check(resolution: int) -> int:
    if int(resolution) < 8:
        raise ConfigError(f"resolution must be at least 8 pixels, got {resolution}")
    return int(resolution)


def train_transform(mean, std, resolution: int) -> T.Compose:
    """DomainBed's augmentation: RandomResizedCrop(res, scale=(0.7, 1)), flip, ColorJitter(0.3 x4),
    RandomGrayscale, ToTensor, Normalize. Random draws use torch's global generator; the loaders
    seed it per example (see :mod:`linft.data.loaders`)."""
    res = _check(resolution)
    return T.Compose([ToRGB(), T.RandomResizedCrop(res, scale=(0.7, 1.0)), T.RandomHorizontalFlip(),
                      T.ColorJitter(0.3, 0.3, 0.3, 0.3), T.RandomGrayscale(), T.ToTensor(),
                      T.Normalize(mean=list(mean), std=list(std))])


def eval_transform(mean, std, resolution: int) -> T.Compose:
    """Resize((res, res)), ToTensor, Normalize: deterministic."""
    res = _check(resolution)
    return T.Compose([ToRGB(), T.Resize((res, res)), T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))])


def transforms_for(backbone, resolution: int | None = None, augment: bool = False) -> T.Compose:
    """The train (``augment=True``) or eval transform for a backbone name or BackboneSpec."""
    from linft.models.backbones import BackboneSpec, get_spec
    spec = backbone if isinstance(backbone, BackboneSpec) else get_spec(backbone)
    res = spec.resolution if resolution is None else resolution
    return (train_transform if augment else eval_transform)(spec.mean, spec.std, res)


def is_random(transform) -> bool:
    """Whether a transform pipeline holds a random (augmenting) step."""
    random_types = (T.RandomResizedCrop, T.RandomHorizontalFlip, T.ColorJitter, T.RandomGrayscale,
                    T.RandomCrop, T.RandomRotation, T.RandomApply, T.RandomAffine)
    steps = getattr(transform, "transforms", [transform])
    return any(isinstance(t, random_types) for t in steps)
