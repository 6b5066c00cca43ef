"""ImageNet-pretrained torchvision backbones, split into a frozen stem and a trainable tail.

Weights load through torchvision's own weights API, so where a network exists the official files are
downloaded; offline, files placed in torch's hub cache (`$TORCH_HOME/hub/checkpoints/`) are used as they are.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchvision import models


@dataclass(frozen=True)
class BackboneSpec:
    builder: Callable[..., nn.Module]
    weights: models.WeightsEnum
    default_stem_blocks: int  # features[:n] stay frozen; the rest is fine-tuned


BACKBONES: dict[str, BackboneSpec] = {
    "mobilenet_v3_large": BackboneSpec(models.mobilenet_v3_large, models.MobileNet_V3_Large_Weights.IMAGENET1K_V1, 7),
    "mobilenet_v3_small": BackboneSpec(models.mobilenet_v3_small, models.MobileNet_V3_Small_Weights.IMAGENET1K_V1, 7),
    "mobilenet_v2": BackboneSpec(models.mobilenet_v2, models.MobileNet_V2_Weights.IMAGENET1K_V1, 14),
}


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could neither be found in the hub cache nor downloaded."""


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def seed_hub_cache(weights_dir: Path) -> list[Path]:
    """Copy `*.pth` files from `weights_dir` into torch's hub cache so torchvision finds them offline."""
    target = hub_checkpoint_dir()
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for source in sorted(Path(weights_dir).glob("*.pth")):
        destination = target / source.name
        if not destination.exists():
            shutil.copyfile(source, destination)
            copied.append(destination)
    return copied


def weights_filename(arch: str) -> str:
    return BACKBONES[arch].weights.url.rsplit("/", 1)[-1]


def build_backbone(arch: str, num_classes: int, pretrained: bool = True) -> nn.Module:
    """torchvision `arch` with its ImageNet weights and a fresh `num_classes` output layer.

    Random initialisation happens only when `pretrained=False` is asked for explicitly.
    """
    if arch not in BACKBONES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(BACKBONES)}")
    spec = BACKBONES[arch]
    weights = spec.weights if pretrained else None
    try:
        model = spec.builder(weights=weights)
    except Exception as error:  # torchvision raises URLError, RuntimeError or OSError offline
        raise WeightsUnavailable(
            f"ImageNet weights for {arch} are not available ({type(error).__name__}: {error}). "
            f"Put {weights_filename(arch)} into {hub_checkpoint_dir()} (or pass --weights-dir DIR holding it)."
        ) from None
    last = model.classifier[-1]
    model.classifier[-1] = nn.Linear(last.in_features, num_classes)
    return model


class StemTail(nn.Module):
    """`stem` (frozen, its output can be cached) followed by `tail` (fine-tuned): the exported network."""

    def __init__(self, model: nn.Module, stem_blocks: int) -> None:
        super().__init__()
        self.stem = model.features[:stem_blocks]
        self.tail = nn.Sequential(model.features[stem_blocks:], nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                                  model.classifier)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tail(self.stem(images))


def freeze_batchnorm(module: nn.Module) -> None:
    """Keep every BatchNorm in eval mode: the offline weights have BN fused into the convs (pass-through
    layers), so batch statistics would wreck the pretrained features; small CPU batches are noisy anyway."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()
