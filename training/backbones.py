"""Pretrained backbones (ImageNet MobileNets, CSAIL's Places365 scene network), split into a frozen stem and a
trainable tail.

`BACKBONES` is the one place that knows them: `--arch`/`--archs`, `make compare` and the recipe all read it,
so adding a backbone is adding one `Backbone` entry there. Weights load through torchvision's own weights API
(and CSAIL's published file for Places365), so where a network exists the official files are downloaded;
offline, files placed in torch's hub cache (`$TORCH_HOME/hub/checkpoints/`) are used as they are.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn
from torchvision import models

from training.places365 import CHECKPOINT_URL, places365_student
from training.weights import WeightsUnavailable, hub_checkpoint_dir, seed_hub_cache  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Backbone:
    """How to build one network and how to cut it, so that nothing else assumes its attribute names.

    After timm's model-agnostic `forward_features` / `get_classifier` / `reset_classifier`: the network is
    `blocks` run in order, global average pooling, then `head`; both are named by submodule.
    """

    build: Callable[..., nn.Module]  # called as build(weights=...), weights None for a random start
    weights: models.WeightsEnum | str  # torchvision's weights, or a checkpoint URL (its file name is what
    # --weights-dir must hold)
    default_stem_blocks: int  # the first N blocks stay frozen (their outputs are cached), the rest is fine-tuned
    blocks: str | tuple[str, ...] = "features"  # one nn.Sequential of blocks, or top-level submodules in order
    head: str = "classifier"  # takes the pooled, flattened features; its last nn.Linear becomes ours

    def feature_blocks(self, model: nn.Module) -> nn.Sequential:
        """The convolutional body as one nn.Sequential (slicing it keeps the block names: checkpoint keys)."""
        if isinstance(self.blocks, str):
            body = model.get_submodule(self.blocks)
            if not isinstance(body, nn.Sequential):
                raise TypeError(f"{self.blocks!r} is a {type(body).__name__}, not an nn.Sequential of blocks")
            return body
        return nn.Sequential(OrderedDict((name, model.get_submodule(name)) for name in self.blocks))

    def classifier(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.head)

    def reset_classifier(self, model: nn.Module, num_classes: int) -> None:
        """Replace the head's last nn.Linear (ImageNet's 1000 outputs) by a fresh `num_classes` one."""
        linears = [name for name, layer in self.classifier(model).named_modules() if isinstance(layer, nn.Linear)]
        if not linears:
            raise TypeError(f"head {self.head!r} has no nn.Linear to replace")
        target = f"{self.head}.{linears[-1]}" if linears[-1] else self.head
        model.set_submodule(target, nn.Linear(model.get_submodule(target).in_features, num_classes))


RESNET_BLOCKS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")

# `python -m training compare` (and `make compare`) trains them all, in this order.
BACKBONES: dict[str, Backbone] = {
    "mobilenet_v3_small": Backbone(models.mobilenet_v3_small, models.MobileNet_V3_Small_Weights.IMAGENET1K_V1, 7),
    "mobilenet_v2": Backbone(models.mobilenet_v2, models.MobileNet_V2_Weights.IMAGENET1K_V1, 14),
    "mobilenet_v3_large": Backbone(models.mobilenet_v3_large, models.MobileNet_V3_Large_Weights.IMAGENET1K_V1, 7),
    # CSAIL's Places365 scene network as it was trained (no stem max-pool: ~4x a ResNet-18's cost); the last
    # stage (layer4) and the classifier are fine-tuned on cached layer3 outputs
    "places365_resnet18": Backbone(places365_student, CHECKPOINT_URL, 7, blocks=RESNET_BLOCKS, head="fc"),
    # the same weights with the stem max-pool put back (a standard ResNet-18's cost); layer3 and layer4 are
    # fine-tuned so that the network re-adapts to features at half the resolution
    "places365_resnet18_maxpool": Backbone(partial(places365_student, max_pool=True), CHECKPOINT_URL, 6,
                                           blocks=RESNET_BLOCKS, head="fc"),
}


def backbone(arch: str) -> Backbone:
    if arch not in BACKBONES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {list(BACKBONES)}")
    return BACKBONES[arch]


def weights_filename(arch: str) -> str:
    weights = backbone(arch).weights
    return (weights if isinstance(weights, str) else weights.url).rsplit("/", 1)[-1]


def build_backbone(arch: str, num_classes: int, pretrained: bool = True) -> nn.Module:
    """The registry's `arch` with its pretrained weights and a fresh `num_classes` output layer.

    Random initialisation happens only when `pretrained=False` is asked for explicitly.
    """
    spec = backbone(arch)
    weights = spec.weights if pretrained else None
    try:
        model = spec.build(weights=weights)
    except Exception as error:  # torchvision raises URLError, RuntimeError or OSError offline
        raise WeightsUnavailable(
            f"pretrained weights for {arch} are not available ({type(error).__name__}: {error}). "
            f"Put {weights_filename(arch)} into {hub_checkpoint_dir()} (or pass --weights-dir DIR holding it)."
        ) from None
    spec.reset_classifier(model, num_classes)
    return model


def build_stem_tail(arch: str, num_classes: int, pretrained: bool = True, stem_blocks: int | None = None) -> StemTail:
    """`build_backbone`, cut after `stem_blocks` blocks (None: the registry's cut for `arch`)."""
    spec = backbone(arch)
    model = build_backbone(arch, num_classes, pretrained)
    cut = spec.default_stem_blocks if stem_blocks is None else stem_blocks
    return StemTail(spec.feature_blocks(model), spec.classifier(model), cut)


class StemTail(nn.Module):
    """`stem` (frozen, its output can be cached) followed by `tail` (fine-tuned): the exported network.

    `tail` = the remaining blocks, global average pooling, the head; checkpoints hold `stem.*` and `tail.*`.
    """

    def __init__(self, blocks: nn.Sequential, head: nn.Module, stem_blocks: int) -> None:
        super().__init__()
        if not 0 <= stem_blocks <= len(blocks):
            raise ValueError(f"stem_blocks must be between 0 and {len(blocks)} (the network's blocks), "
                             f"got {stem_blocks}")
        self.stem = blocks[:stem_blocks]
        self.tail = nn.Sequential(blocks[stem_blocks:], nn.AdaptiveAvgPool2d(1), nn.Flatten(1), head)

    @property
    def head(self) -> nn.Module:
        """The classifier (a property, not a second registered child: the checkpoint keys stay as they are)."""
        return self.tail[-1]

    def tail_body_parameters(self) -> list[nn.Parameter]:
        """The tail's parameters outside the head, in module order (the fine-tune's lower learning rate)."""
        in_head = {id(parameter) for parameter in self.head.parameters()}
        return [parameter for parameter in self.tail.parameters() if id(parameter) not in in_head]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tail(self.stem(images))


def freeze_batchnorm(module: nn.Module) -> None:
    """Keep every BatchNorm in eval mode: the offline weights have BN fused into the convs (pass-through
    layers), so batch statistics would wreck the pretrained features; small CPU batches are noisy anyway."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()
