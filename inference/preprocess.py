"""Image -> model input tensor. The single definition of preprocessing.

Training evaluates the exported ONNX model through this module and stores a `Preprocessing` in the
model's metadata; the service rebuilds it from that metadata. So what was measured is what is served.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from inference.decode import DEFAULT_LIMITS, ImageLimits, decode_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to `resize_size` (bilinear), centre-crop `image_size`, scale to [0, 1],
    normalise with `mean`/`std`, lay out as CHW float32."""

    image_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std),
                "rule": "resize shorter side (bilinear), center crop, RGB /255, (x-mean)/std, NCHW float32"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        return cls(image_size=int(data["image_size"]), resize_size=int(data["resize_size"]),
                   mean=tuple(float(v) for v in data["mean"]), std=tuple(float(v) for v in data["std"]))


def resize_and_crop(image: Image.Image, config: Preprocessing) -> Image.Image:
    """Shorter side to `resize_size`, then the central `image_size` square (torchvision's eval transform)."""
    image = trim_long_side(image)
    width, height = image.size
    scale = config.resize_size / min(width, height)
    new_w, new_h = max(config.image_size, round(width * scale)), max(config.image_size, round(height * scale))
    image = image.resize((new_w, new_h), Image.BILINEAR)
    left = int(round((new_w - config.image_size) / 2.0))
    top = int(round((new_h - config.image_size) / 2.0))
    return image.crop((left, top, left + config.image_size, top + config.image_size))


def trim_long_side(image: Image.Image, max_aspect_ratio: float = 2.0) -> Image.Image:
    """Centre-crop a very elongated image to `max_aspect_ratio` before resizing.

    Only the central square survives the crop anyway; without this a 1x10000 strip would be resized to
    256x2,560,000 pixels (gigabytes) on the way. Ordinary photos (up to 2:1) pass untouched.
    """
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if long <= short * max_aspect_ratio:
        return image
    keep = int(short * max_aspect_ratio)
    if width > height:
        left = (width - keep) // 2
        return image.crop((left, 0, left + keep, height))
    top = (height - keep) // 2
    return image.crop((0, top, width, top + keep))


def normalize(image: Image.Image, config: Preprocessing) -> np.ndarray:
    """RGB uint8 HWC image -> normalised float32 CHW array."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    array = (array - np.asarray(config.mean, dtype=np.float32)) / np.asarray(config.std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def preprocess(image: Image.Image, config: Preprocessing) -> np.ndarray:
    """One RGB image -> float32 array of shape (3, image_size, image_size)."""
    return normalize(resize_and_crop(image, config), config)


def preprocess_batch(images: Sequence[Image.Image], config: Preprocessing) -> np.ndarray:
    """RGB images -> float32 array of shape (N, 3, image_size, image_size)."""
    return np.stack([preprocess(image, config) for image in images]) if images else np.zeros(
        (0, 3, config.image_size, config.image_size), dtype=np.float32)


def bytes_to_input(data: bytes, config: Preprocessing, limits: ImageLimits = DEFAULT_LIMITS,
                   jpeg_draft: bool = True) -> np.ndarray:
    """Untrusted image bytes -> model input, exactly as the service does it: the hardened decoder (large
    JPEGs decoded at reduced scale, never below `resize_size`, when `jpeg_draft`), then `preprocess`."""
    min_size = config.resize_size if jpeg_draft else None
    return preprocess(decode_image(data, limits, min_size=min_size), config)
