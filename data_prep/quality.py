"""Clean, part 1: decode every candidate completely, measure brightness and contrast, hash it.

Decoding uses PIL's JPEG `draft` mode: libjpeg still reads and entropy-decodes the whole file (so a
truncated or damaged JPEG fails exactly as in a full-size decode), but it scales the DCT output down,
which makes the check several times faster. Non-JPEG formats decode at full size.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, UnidentifiedImageError

from data_prep.common import IMAGE_EXTENSIONS, Settings, progress

# Chunks of work sent to each process: big enough to amortise pickling, small enough for a smooth progress bar.
CHUNK_SIZE = 32


@dataclass(frozen=True)
class ImageCheck:
    """What decoding one file found. `problem` is None for a usable image, else a reason from REASONS."""

    problem: str | None
    detail: str = ""
    width: int = 0
    height: int = 0
    brightness: float = 0.0  # mean grey level, 0 (black) .. 1 (white)
    contrast: float = 0.0  # standard deviation of the grey level, 0 .. 0.5
    phash: str = ""  # perceptual hash as hex, empty when the file did not decode


def _decode_small(path: Path, side: int) -> tuple[Image.Image, tuple[int, int]]:
    """Fully decode `path` at about `side` pixels (JPEG draft) and return it with its original size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EXIF and palette warnings are not our business
        with Image.open(path) as image:
            size = image.size
            image.draft("L", (side, side))  # JPEG only: libjpeg decodes straight to grey, scaled
            image.load()
            return image.convert("L"), size


def check_image(path: Path, settings: Settings) -> ImageCheck:
    """Decode, measure and hash one file; every failure becomes a reason, never an exception."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        extension = path.suffix or "no extension"
        return ImageCheck("unsupported_extension", f"{extension} is not one of {' '.join(IMAGE_EXTENSIONS)}")
    try:
        grey, (width, height) = _decode_small(path, side=max(64, settings.hash_size * 8))
    except UnidentifiedImageError:
        return ImageCheck("not_image", "not a recognised image format")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return ImageCheck("corrupt", str(error).replace(str(path), path.name) or type(error).__name__)
    pixels = np.asarray(grey, dtype=np.float32) / 255.0
    brightness, contrast = round(float(pixels.mean()), 4), round(float(pixels.std()), 4)
    phash = str(imagehash.phash(grey, hash_size=settings.hash_size))
    measured = dict(width=width, height=height, brightness=brightness, contrast=contrast, phash=phash)
    if brightness < settings.dark_threshold:
        return ImageCheck("dark", f"mean brightness {brightness:.3f} < {settings.dark_threshold}", **measured)
    if contrast < settings.blank_threshold:
        return ImageCheck("blank", f"grey-level std {contrast:.3f} < {settings.blank_threshold}", **measured)
    return ImageCheck(None, **measured)


def check_images(paths: Sequence[Path], settings: Settings) -> list[ImageCheck]:
    """`check_image` over all paths, in order, on `settings.workers` processes, with a progress bar."""
    check = partial(check_image, settings=settings)
    show = partial(progress, total=len(paths), desc="Decoding + hashing", unit=" img")
    if settings.workers <= 1 or len(paths) < 2 * CHUNK_SIZE:
        return list(show(map(check, paths)))
    with ProcessPoolExecutor(max_workers=settings.workers) as pool:
        results: Iterable[ImageCheck] = pool.map(check, paths, chunksize=CHUNK_SIZE)
        return list(show(results))
