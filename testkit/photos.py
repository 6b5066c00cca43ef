"""Real room photos from the shared data folder (read in place, never copied into the repo), and re-encoded
copies at the sizes phones and listing sites upload."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from data_prep.common import CLASSES  # the four labels, in the order training gives them indices
from testkit.server import REPO_ROOT

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
PHOTO_SOURCES = ("extra/house_rooms", "extra/places365")
REAL_PHOTOS_DIR = Path(os.environ.get("ROOM_TEST_PHOTOS", DEFAULT_DATA / "extra" / "house_rooms"))


def real_photos(per_class: int = 2) -> list[Path]:
    """The first `per_class` photos of each class in REAL_PHOTOS_DIR, by name; [] if absent."""
    photos: list[Path] = []
    for label in CLASSES:
        folder = REAL_PHOTOS_DIR / label
        if folder.is_dir():
            photos += sorted(folder.glob("*.jpg"))[:per_class]
    return photos


def find_room_photos(data_dir: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` readable photos spread evenly over the four classes of the `extra/` sources."""
    rng = random.Random(seed)
    per_class: dict[str, list[Path]] = {}
    for room in CLASSES:
        paths = [p for source in PHOTO_SOURCES for p in sorted((data_dir / source / room).glob("*.jpg"))]
        rng.shuffle(paths)
        per_class[room] = paths
    if not any(per_class.values()):
        raise FileNotFoundError(f"no photos under {data_dir}/extra/*/<class>/ (see {data_dir}/README.md)")
    chosen: list[Path] = []
    while len(chosen) < count and any(per_class.values()):
        for room in CLASSES:
            while per_class[room] and len(chosen) < count:
                path = per_class[room].pop()
                if is_readable_image(path):
                    chosen.append(path)
                    break
    return chosen


def is_readable_image(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except Exception:
        return False


def resize_to_fill(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale and centre-crop to exactly `size`, keeping the photo's proportions (no stretching)."""
    width, height = size
    scale = max(width / image.width, height / image.height)
    scaled = image.convert("RGB").resize((max(width, round(image.width * scale)),
                                          max(height, round(image.height * scale))), Image.BICUBIC)
    left, top = (scaled.width - width) // 2, (scaled.height - height) // 2
    return scaled.crop((left, top, left + width, top + height))


def write_jpegs(photos: Sequence[Path], size: tuple[int, int], out_dir: Path, quality: int = 90) -> list[Path]:
    """Re-encode each photo as a `size` JPEG (what a phone or listing site uploads) under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, photo in enumerate(photos):
        target = out_dir / f"{index:04d}_{photo.parent.name}_{size[0]}x{size[1]}.jpg"
        with Image.open(photo) as image:
            resize_to_fill(image, size).save(target, "JPEG", quality=quality)
        written.append(target)
    return written
