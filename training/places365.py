"""CSAIL's Places365 "wideresnet18": the scene network, as a teacher (training/teacher.py) and as a student
backbone (training/backbones.py).

The checkpoint is CSAIL's own file (`wideresnet18_places365.pth.tar`: a dict whose `state_dict` keys carry
DataParallel's `module.` prefix). CSAIL's "wideresnet18" is torchvision's ResNet-18 without the stem max-pool,
so after stripping the prefix it loads strictly into `resnet18(num_classes=365)` with `maxpool = Identity`.
Where a network exists the file is downloaded from CSAIL's published URL into torch's hub cache (as
torchvision does for its own weights); offline it is read from `--weights-dir` (or found in that cache).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models

from training.weights import WeightsUnavailable, hub_checkpoint_dir

CHECKPOINT_NAME = "wideresnet18_places365.pth.tar"
CHECKPOINT_URL = f"http://places2.csail.mit.edu/models_places365/{CHECKPOINT_NAME}"
NUM_SCENES = 365


class TeacherUnavailable(WeightsUnavailable):
    """The Places365 checkpoint is neither in `--weights-dir`, nor in the hub cache, nor downloadable."""


def find_checkpoint(weights_dir: Path | None) -> Path | None:
    """The checkpoint inside `weights_dir` (or its `places365/` folder), else in torch's hub cache."""
    candidates = []
    if weights_dir is not None:
        candidates += [Path(weights_dir) / "places365" / CHECKPOINT_NAME, Path(weights_dir) / CHECKPOINT_NAME]
    candidates.append(hub_checkpoint_dir() / CHECKPOINT_NAME)
    return next((path for path in candidates if path.is_file()), None)


def load_checkpoint(weights_dir: Path | None = None) -> dict:
    """CSAIL's checkpoint dict, from disk or (where a network exists) downloaded once into the hub cache."""
    path = find_checkpoint(weights_dir)
    if path is not None:
        return torch.load(path, map_location="cpu", weights_only=True)
    try:
        return torch.hub.load_state_dict_from_url(CHECKPOINT_URL, model_dir=str(hub_checkpoint_dir()),
                                                  map_location="cpu", file_name=CHECKPOINT_NAME, weights_only=True)
    except Exception as error:  # URLError, OSError, HTTP errors offline
        searched = f"{Path(weights_dir) / 'places365'} or " if weights_dir is not None else ""
        raise TeacherUnavailable(
            f"the Places365 checkpoint {CHECKPOINT_NAME} is not available ({type(error).__name__}: {error}). "
            f"Put it into {searched}{hub_checkpoint_dir()} "
            f"(pass --weights-dir DIR holding places365/{CHECKPOINT_NAME})."
        ) from None


def places365_resnet18() -> nn.Module:
    """CSAIL's "wideresnet18" in torchvision modules: ResNet-18 with basic blocks and no stem max-pool."""
    model = models.resnet18(num_classes=NUM_SCENES)
    model.maxpool = nn.Identity()
    return model


def strip_data_parallel(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


def load_places365_resnet18(weights_dir: Path | None = None) -> nn.Module:
    """The scene network with every weight loaded strictly (a mismatch is an error, never a silent skip)."""
    checkpoint = load_checkpoint(weights_dir)
    state_dict = checkpoint["state_dict"] if "state_dict" in checkpoint else checkpoint
    network = places365_resnet18()
    network.load_state_dict(strip_data_parallel(state_dict), strict=True)
    return network


def places365_student(weights: str | None = None, max_pool: bool = False) -> nn.Module:
    """The scene network as a backbone: `weights` is CSAIL's checkpoint URL (found in the hub cache offline) or
    None for a random start. `max_pool=True` puts back the stem max-pool CSAIL's network dropped: a standard
    ResNet-18's cost (4x less), features at half the resolution the pretrained layers learnt on, so the
    fine-tune must re-adapt more of the network."""
    network = load_places365_resnet18() if weights is not None else places365_resnet18()
    if max_pool:
        network.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    return network
