"""CSAIL's Places365 WideResNet-18 as a scene-recognition teacher for distillation: its 365 scenes grouped into
our labels (the network and its checkpoint: training/places365.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from data_prep.common import OTHER
from inference.preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize_pixels, trim_long_side
from training.places365 import (  # noqa: F401 (TeacherUnavailable: re-exported for callers)
    NUM_SCENES,
    TeacherUnavailable,
    load_places365_resnet18,
)

CATEGORIES_NAME = "categories_places365.txt"
# The Places365 scenes a listing photo of each room may be called (categories_places365.txt: "/b/bathroom 45"):
# the teacher's probability of a room is the sum over its scenes, and OTHER gets every scene not listed here.
# Without the near-synonyms a real bedroom the teacher calls "hotel_room" would teach the student "other".
ROOM_SCENES: dict[str, dict[str, int]] = {
    "bathroom": {"bathroom": 45, "shower": 303},
    "bedroom": {"bedroom": 52, "bedchamber": 51, "hotel_room": 182, "dorm_room": 124, "childs_room": 89,
                "nursery": 240},
    "kitchen": {"kitchen": 203, "galley": 155},
    "living_room": {"living_room": 215, "television_room": 328},
}
# The soft-target cache's key names the transform with this text, written when the transform was still described
# by a student `Preprocessing` (whose rule it is: the teacher squashes, it does not resize the shorter side).
# Changing a byte would orphan every cached teacher output, so the key keeps it (`TeacherTransform.cache_key_text`).
CACHE_KEY_RULE = "resize shorter side (bilinear), center crop, RGB /255, (x-mean)/std, NCHW float32"


@dataclass(frozen=True)
class TeacherTransform:
    """CSAIL's Places365 evaluation transform, what the teacher was trained to see: the whole photo squashed to
    `resize_size` x `resize_size` (aspect ratio not kept, unlike the student's `Preprocessing`, which resizes
    the shorter side), the central `image_size` square, ImageNet mean/std. Photos beyond 2:1 are first trimmed
    to 2:1 (`trim_long_side`), as the student's are."""

    resize_size: int = 256
    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def cache_key_text(self) -> str:
        """This transform as the soft-target cache's key hashes it (`training.soft_targets.teacher_key`): the
        same text as before the transform had its own class, so cached teacher outputs are still found."""
        return json.dumps({"image_size": self.image_size, "resize_size": self.resize_size, "mean": list(self.mean),
                           "std": list(self.std), "rule": CACHE_KEY_RULE}, sort_keys=True)


TEACHER_TRANSFORM = TeacherTransform()


def scene_membership(labels: list[str]) -> np.ndarray:
    """[365, len(labels)] 0/1: which Places scenes make up each of our labels (OTHER: every unlisted scene)."""
    unknown = [label for label in labels if label not in ROOM_SCENES and label != OTHER]
    if unknown:
        raise ValueError(f"the Places365 teacher knows no class {unknown}; it knows {sorted(ROOM_SCENES)} and {OTHER}")
    membership = np.zeros((NUM_SCENES, len(labels)), dtype=np.float32)
    for column, label in enumerate(labels):
        if label != OTHER:
            membership[list(ROOM_SCENES[label].values()), column] = 1.0
    if OTHER in labels:
        membership[:, labels.index(OTHER)] = 1.0 - membership.sum(axis=1).clip(max=1.0)
    return membership


PROBABILITY_FLOOR = 1e-12  # a label the teacher gives no mass at all: log(0) would be -inf in the KL


def grouped_log_probabilities(scene_logits: torch.Tensor, membership: torch.Tensor) -> torch.Tensor:
    """log(softmax(scene logits) @ membership): the teacher's log-probability of each of our labels. A softmax
    over these is its belief among our labels (for the four rooms alone: renormalised over their scenes)."""
    return torch.log((torch.softmax(scene_logits.float(), dim=1) @ membership).clamp_min(PROBABILITY_FLOOR))


class Places365Teacher(nn.Module):
    """Scene network whose `forward` gives the log-probabilities of our classes, in `labels` order."""

    def __init__(self, network: nn.Module, labels: list[str]) -> None:
        super().__init__()
        self.network = network
        self.labels = list(labels)
        self.register_buffer("membership", torch.from_numpy(scene_membership(self.labels)))

    def scene_logits(self, images: torch.Tensor) -> torch.Tensor:
        """All 365 Places logits (kept for the label audit: what the teacher thinks a photo shows)."""
        return self.network(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return grouped_log_probabilities(self.scene_logits(images), self.membership)


def load_teacher(labels: list[str], weights_dir: Path | None = None) -> Places365Teacher:
    """The teacher in eval mode, every weight loaded strictly (a mismatch is an error, never a silent skip)."""
    return Places365Teacher(load_places365_resnet18(weights_dir), labels).eval()


def scene_names(weights_dir: Path | None) -> list[str]:
    """The 365 Places class names (`/b/bedroom` -> `bedroom`) when the categories file is at hand, else indices."""
    for folder in ([Path(weights_dir) / "places365", Path(weights_dir)] if weights_dir is not None else []):
        path = folder / CATEGORIES_NAME
        if path.is_file():
            names = [""] * NUM_SCENES
            for line in path.read_text().splitlines():
                if line.strip():
                    name, index = line.rsplit(" ", 1)
                    names[int(index)] = name[3:]
            return names
    return [str(index) for index in range(NUM_SCENES)]


def teacher_preprocess(image: Image.Image, transform: TeacherTransform = TEACHER_TRANSFORM) -> np.ndarray:
    """One RGB image -> the teacher's float32 input (3, image_size, image_size), by `transform`."""
    size, crop = transform.resize_size, transform.image_size
    image = trim_long_side(image).convert("RGB").resize((size, size), Image.BILINEAR)
    offset = (size - crop) // 2
    image = image.crop((offset, offset, offset + crop, offset + crop))
    return normalize_pixels(np.asarray(image, dtype=np.uint8)[None], transform)[0]
