"""Image -> model input tensor. The single definition of preprocessing.

Two halves: `to_pixels` / `bytes_to_pixels` (decode, resize, centre crop -> uint8 pixels) run where the
image arrives; `normalize_pixels` (uint8 -> normalised float32 NCHW) runs next to the model, on a batch.
`preprocess` and `bytes_to_input` chain both for one image.

Training evaluates the exported ONNX model through this module and stores a `Preprocessing` in the
model's metadata; the service rebuilds it from that metadata. So what was measured is what is served.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from inference.decode import ImageLimits, decode_image

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


def to_pixels(image: Image.Image, config: Preprocessing) -> np.ndarray:
    """One RGB image -> the model's view of it as uint8 pixels, shape (image_size, image_size, 3).

    This is what the service hands to the model process: 4x fewer bytes than the normalised float32 input.
    """
    return np.asarray(resize_and_crop(image, config).convert("RGB"), dtype=np.uint8)


def normalize_pixels(pixels: np.ndarray, config: Preprocessing) -> np.ndarray:
    """uint8 pixels (N, S, S, 3) -> normalised float32 model input (N, 3, S, S).

    A 256-entry table per channel holds (v / 255 - mean) / std computed in float32, so the result is
    bit-for-bit that arithmetic on every pixel, at one table look-up per value instead of four passes.
    """
    table = normalization_table(config.mean, config.std)
    out = np.empty((pixels.shape[0], 3, *pixels.shape[1:3]), dtype=np.float32)
    for channel in range(3):
        np.take(table[channel], pixels[..., channel], out=out[:, channel])
    return out


@functools.lru_cache(maxsize=8)
def normalization_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """float32 [3, 256]: the normalised value of each 8-bit level in each channel."""
    levels = np.arange(256, dtype=np.float32)[None, :] / 255.0
    return (levels - np.asarray(mean, dtype=np.float32)[:, None]) / np.asarray(std, dtype=np.float32)[:, None]


def preprocess(image: Image.Image, config: Preprocessing) -> np.ndarray:
    """One RGB image -> float32 array of shape (3, image_size, image_size)."""
    return normalize_pixels(to_pixels(image, config)[None], config)[0]


def preprocess_batch(images: Sequence[Image.Image], config: Preprocessing) -> np.ndarray:
    """RGB images -> float32 array of shape (N, 3, image_size, image_size)."""
    return np.stack([preprocess(image, config) for image in images]) if images else np.zeros(
        (0, 3, config.image_size, config.image_size), dtype=np.float32)


def bytes_to_pixels(data: bytes, config: Preprocessing, limits: ImageLimits, jpeg_draft: bool) -> np.ndarray:
    """Untrusted image bytes -> uint8 pixels (S, S, 3), exactly as the service does it: the hardened
    decoder (large JPEGs decoded at reduced scale, never below `resize_size`, when `jpeg_draft`), then
    resize and centre crop. `normalize_pixels` makes the model input of them."""
    min_size = config.resize_size if jpeg_draft else None
    return to_pixels(decode_image(data, limits, min_size=min_size), config)


def bytes_to_input(data: bytes, config: Preprocessing, limits: ImageLimits, jpeg_draft: bool) -> np.ndarray:
    """Untrusted image bytes -> normalised float32 model input (3, S, S): `bytes_to_pixels`, then
    `normalize_pixels` (what the service's model process does to the pixels it receives)."""
    return normalize_pixels(bytes_to_pixels(data, config, limits, jpeg_draft)[None], config)[0]
