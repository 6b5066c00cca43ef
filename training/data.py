"""Read the split folder that data_prep writes: `<root>/{train,val,test}/<class>/<image>`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from data_prep.common import IMAGE_EXTENSIONS, OTHER
from inference.config import KernelConfig
from inference.decode import decode_image
from inference.preprocess import Preprocessing, preprocess

DECODE_LIMITS = KernelConfig().image_limits()  # the service's default limits (RC_MAX_PIXELS, ...)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int

    @property
    def source(self) -> str:
        """data_prep names files `<source>__<relative path>`; the prefix tells where a photo came from."""
        return self.path.name.split("__", 1)[0] if "__" in self.path.name else "unknown"

    @property
    def scene(self) -> str:
        """The scene type: the class folder for a room; for an `other` photo the scene folder its name carries
        (data_prep names it `<source>__<scene>__<file>`)."""
        folder = self.path.parent.name
        if folder == OTHER and self.path.name.count("__") >= 2:
            return self.path.name.split("__")[1]
        return folder


def discover_labels(root: Path) -> list[str]:
    """Class names from the train split's folders, sorted: the model's output order."""
    train = root / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"{root} is not a dataset folder: {train} is missing (run data_prep first)")
    labels = sorted(p.name for p in train.iterdir() if p.is_dir())
    if len(labels) < 2:
        raise ValueError(f"{train} holds {len(labels)} class folders; need at least 2")
    return labels


def list_samples(root: Path, split: str, labels: list[str], max_per_class: int | None = None) -> list[Sample]:
    """Every image of `split`, in a stable order; at most `max_per_class` per class (the quick profile)."""
    samples = []
    for index, label in enumerate(labels):
        files = sorted(p for p in (root / split / label).glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        samples += [Sample(path, index) for path in files[:max_per_class]]
    return samples


def dataset_fingerprint(root: Path) -> str:
    """sha256 of the manifest data_prep wrote (or of the file list when there is none): ties a model to its data."""
    manifest = root / "manifest.csv"
    digest = hashlib.sha256()
    if manifest.is_file():
        digest.update(manifest.read_bytes())
    else:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                digest.update(str(path.relative_to(root)).encode())
    return digest.hexdigest()


# The MiniPlaces "other" photos are 128 px while the room photos are 256 px or more: shown at full resolution
# only, rooms would teach the model that "sharp" means "room". Every photo, whatever its class, is seen at
# 128 px (then upsampled by the crop) with this probability, so resolution tells nothing about the class.
LOW_RESOLUTION_SIDE = 128
LOW_RESOLUTION_P = 0.5


class RandomLowResolution(torch.nn.Module):
    """With probability `p`, shrink a PIL image so its shorter side is `side` (images already that small stay)."""

    def __init__(self, side: int = LOW_RESOLUTION_SIDE, p: float = LOW_RESOLUTION_P) -> None:
        super().__init__()
        self.side, self.p = side, p

    def forward(self, image: Image.Image) -> Image.Image:
        shorter = min(image.size)
        if shorter <= self.side or torch.rand(1).item() >= self.p:
            return image
        scale = self.side / shorter
        return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)


def train_augmentation(config: Preprocessing) -> T.Compose:
    """Augmentation for room photos: crops that keep most of the room, mirror (rooms are left/right
    symmetric, never upside down), mild colour and lighting changes of real listings, and low resolution
    (see LOW_RESOLUTION_P) so that image size is never the cue for `other`."""
    return T.Compose([
        RandomLowResolution(),
        T.RandomResizedCrop(config.image_size, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
        T.RandomHorizontalFlip(),
        T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.25, hue=0.02),
        T.RandomGrayscale(p=0.05),
        T.PILToTensor(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean=list(config.mean), std=list(config.std)),
    ])


def load_rgb(path: Path) -> Image.Image:
    """The service's own decoder (EXIF orientation, transparency on white, CMYK, 16-bit), full resolution."""
    return decode_image(path.read_bytes(), DECODE_LIMITS)


class ImageDataset(torch.utils.data.Dataset):
    """Samples as tensors: augmented views for training, or the service's own preprocessing (`augment=None`)."""

    def __init__(self, samples: list[Sample], config: Preprocessing, augment: T.Compose | None = None) -> None:
        self.samples, self.config, self.augment = samples, config, augment

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        image = load_rgb(sample.path)
        if self.augment is None:
            return torch.from_numpy(preprocess(image, self.config)), sample.label
        return self.augment(image), sample.label


def class_weights(samples: list[Sample], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, mean 1: the loss counts every class equally whatever its size."""
    counts = np.bincount([s.label for s in samples], minlength=num_classes).astype(np.float64)
    weights = counts.sum() / (num_classes * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)
