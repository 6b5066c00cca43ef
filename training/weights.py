"""Where pretrained weight files live: torch's hub cache, seeded from a folder on machines without a network."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could neither be found in the hub cache nor downloaded."""


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


# torchvision's files lie at the top of a weights folder, CSAIL's Places365 checkpoint in its places365/ folder
WEIGHT_FILE_PATTERNS = ("*.pth", "places365/*.pth.tar")


def seed_hub_cache(weights_dir: Path) -> list[Path]:
    """Copy the weight files in `weights_dir` into torch's hub cache so torchvision (and the Places365 loader)
    find them offline, exactly where they would have downloaded them."""
    target = hub_checkpoint_dir()
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for pattern in WEIGHT_FILE_PATTERNS:
        for source in sorted(Path(weights_dir).glob(pattern)):
            destination = target / source.name
            if not destination.exists():
                shutil.copyfile(source, destination)
                copied.append(destination)
    return copied
