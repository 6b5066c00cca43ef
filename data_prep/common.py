"""Names and settings shared by every data_prep stage."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")

# The four rooms, alphabetical: the order torchvision's ImageFolder gives class indices in.
CLASSES: tuple[str, ...] = ("bathroom", "bedroom", "kitchen", "living_room")
# The fifth answer, "none of these rooms": photos from --other trees (house fronts, yards, dining rooms, ...).
# Sorted after the rooms, so a dataset with it has the labels CLASSES + (OTHER,) in ImageFolder order.
OTHER = "other"
# Scene types of the --other trees that are split photo by photo, like the rooms: the rooms a listing gallery
# holds most often besides our four, which the model must know. Every other scene type goes whole into one
# split (leave-scenes-out), so val and test measure scene types the model never saw in training.
KNOWN_OTHER_SCENES: tuple[str, ...] = ("dining_room", "entrance_hall")
SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_RATIO: tuple[float, float, float] = (0.7, 0.2, 0.1)
SUNRGBD_SOURCE = "sunrgbd"

# The formats the service accepts (inference.decode's allow-list): training on photos the product refuses to
# serve would be pointless. Other files in an extra tree are listed as dropped.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".gif")

# Reasons an image is dropped, in the order the checks run.
REASONS: tuple[str, ...] = (
    "no_image",               # a SUN RGB-D scene whose image/ folder is empty or missing
    "unsupported_extension",  # an extra-tree file ImageFolder would not load
    "not_image",              # the file is not an image at all (e.g. HTML saved as .jpg)
    "corrupt",                # the image does not decode completely (e.g. truncated JPEG)
    "dark",                   # mean brightness below --dark-threshold: a nearly black frame
    "blank",                  # almost no contrast: a uniform frame that shows no room
    "label_conflict",         # the same photo appears under two different classes: no copy is trusted
    "duplicate",              # the same photo again in the same class: one copy is kept
)


def dataset_classes(labels: Iterable[str]) -> tuple[str, ...]:
    """A dataset's class folders, in training's label order: the four rooms, plus OTHER when an --other tree
    gave photos (`labels`: the labels of its candidates or manifest rows)."""
    return CLASSES + ((OTHER,) if OTHER in set(labels) else ())


class DataPrepError(Exception):
    """Bad input or output location: the CLI prints the message on one line and exits non-zero."""


@dataclass(frozen=True)
class Settings:
    """Knobs of the cleaning and splitting steps (all of them end up in summary.json).

    dark_threshold: an image whose mean grey level (0 = black, 1 = white) is below this is `dark`.
        0.06 sits between the planted black frames of the replica (<= 0.045) and the darkest real photos
        (>= 0.078).
    blank_threshold: an image whose grey-level standard deviation (0..1) is below this is `blank`.
    hash_size: perceptual hash side; the hash has hash_size**2 bits.
    max_distance: two images whose hashes differ in at most this many bits are the same photo. With the
        64-bit hash, pairs up to 6 bits apart were all visually identical on the shared data, while pairs
        at 10 bits were different photos.
    seed: split-folders' shuffle seed (and the shuffle of the held-out other scene types).
    known_other_scenes: other scene types split photo by photo; the rest are held out whole (split.py).
    workers: processes that decode and hash images.
    """

    dark_threshold: float = 0.06
    blank_threshold: float = 0.01
    hash_size: int = 8
    max_distance: int = 6
    seed: int = 1337
    known_other_scenes: tuple[str, ...] = KNOWN_OTHER_SCENES
    workers: int = 2

    def describe(self) -> dict[str, Any]:
        """The settings that change the output (not `workers`), for the report."""
        settings = asdict(self)
        settings.pop("workers")
        return {**settings, "known_other_scenes": list(self.known_other_scenes), "split_ratio": list(SPLIT_RATIO)}


def progress(iterable: Iterable[T], **options: Any) -> Iterable[T]:
    """A tqdm progress bar on a terminal; silent when stderr is a pipe or a CI log (and so in tests)."""
    return tqdm(iterable, disable=None, **options)
