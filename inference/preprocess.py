"""Image -> model input tensor. The single definition of preprocessing.

Two halves: `to_pixels` / `bytes_to_pixels` (decode, resize, centre crop -> uint8 pixels) run where the
image arrives; `normalize_pixels` (uint8 -> normalised float32 NCHW) runs next to the model, on a batch.
`preprocess` and `bytes_to_input` chain both for one image.

Training evaluates the exported ONNX model through this module and stores a `Preprocessing` in the
model's metadata; the service rebuilds it from that metadata. So what was measured is what is served.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np
from PIL import Image

from inference.decode import ImageLimits, decode_image, decode_image_sized

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to `resize_size` (bilinear), centre-crop `image_size`, scale to [0, 1],
    normalise with `mean`/`std`, lay out as CHW float32.

    `jpeg_draft`: decode a large JPEG at 1/2-1/8 scale, never below `resize_size` (~4x faster). It changes the
    pixels the model sees, so it is the model's choice, evaluated with it, never a server setting."""

    image_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    jpeg_draft: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe. `jpeg_draft` is written only when false: every dict written before the field existed
        meant true, and stays equal to what it is written as now (stored models, and the recipes in run
        checkpoints that `--resume` and `training.compare` match by equality)."""
        data = {"image_size": self.image_size, "resize_size": self.resize_size, "mean": list(self.mean),
                "std": list(self.std),
                "rule": "resize shorter side (bilinear), center crop, RGB /255, (x-mean)/std, NCHW float32"}
        return data if self.jpeg_draft else {**data, "jpeg_draft": False}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        """The inverse of `to_dict`; a dict without `jpeg_draft` (every model before it) reads as true."""
        jpeg_draft = data.get("jpeg_draft", True)
        if not isinstance(jpeg_draft, bool):
            raise ValueError(f"preprocessing.jpeg_draft must be true or false, got {jpeg_draft!r}")
        return cls(image_size=int(data["image_size"]), resize_size=int(data["resize_size"]),
                   mean=tuple(float(v) for v in data["mean"]), std=tuple(float(v) for v in data["std"]),
                   jpeg_draft=jpeg_draft)


class Normalization(Protocol):
    """What `normalize_pixels` reads of a transform: the channel means and standard deviations (a model's
    `Preprocessing`, or another network's own transform such as training's distillation teacher's)."""

    @property
    def mean(self) -> tuple[float, float, float]: ...

    @property
    def std(self) -> tuple[float, float, float]: ...


Box = tuple[float, float, float, float]  # left, top, right, bottom


def resize_and_crop(image: Image.Image, config: Preprocessing) -> Image.Image:
    """Shorter side to `resize_size`, then the central `image_size` square (torchvision's eval transform)."""
    trim, resized, (left, top) = crop_geometry(*image.size, config)
    if trim is not None:
        image = image.crop(trim)
    image = image.resize(resized, Image.BILINEAR)
    return image.crop((left, top, left + config.image_size, top + config.image_size))


def crop_geometry(width: int, height: int, config: Preprocessing
                  ) -> tuple[tuple[int, int, int, int] | None, tuple[int, int], tuple[int, int]]:
    """The numbers `resize_and_crop` uses for a `width` x `height` image: the box `trim_long_side` keeps (None
    for ordinary photos), the resized size, and the crop's top-left corner in the resized image."""
    trim = trim_box(width, height)
    if trim is not None:
        width, height = trim[2] - trim[0], trim[3] - trim[1]
    scale = config.resize_size / min(width, height)
    new_w, new_h = max(config.image_size, round(width * scale)), max(config.image_size, round(height * scale))
    left = int(round((new_w - config.image_size) / 2.0))
    top = int(round((new_h - config.image_size) / 2.0))
    return trim, (new_w, new_h), (left, top)


def crop_box(width: int, height: int, config: Preprocessing) -> Box:
    """The part of a `width` x `height` image the model sees, in that image's pixel coordinates (edges, not
    pixel centres): where an overlay of the model's view (a heatmap) lands on the photo."""
    trim, (new_w, new_h), (left, top) = crop_geometry(width, height, config)
    x0, y0, x1, y1 = trim if trim is not None else (0, 0, width, height)
    scale_x, scale_y = (x1 - x0) / new_w, (y1 - y0) / new_h  # resizing maps edges linearly
    size = config.image_size
    return (x0 + left * scale_x, y0 + top * scale_y, x0 + (left + size) * scale_x, y0 + (top + size) * scale_y)


def trim_box(width: int, height: int, max_aspect_ratio: float = 2.0) -> tuple[int, int, int, int] | None:
    """The central box `trim_long_side` keeps of a `width` x `height` image; None when it keeps it whole."""
    short, long = min(width, height), max(width, height)
    if long <= short * max_aspect_ratio:
        return None
    keep = int(short * max_aspect_ratio)
    if width > height:
        left = (width - keep) // 2
        return (left, 0, left + keep, height)
    top = (height - keep) // 2
    return (0, top, width, top + keep)


def trim_long_side(image: Image.Image, max_aspect_ratio: float = 2.0) -> Image.Image:
    """Centre-crop a very elongated image to `max_aspect_ratio` before resizing.

    Only the central square survives the crop anyway; without this a 1x10000 strip would be resized to
    256x2,560,000 pixels (gigabytes) on the way. Ordinary photos (up to 2:1) pass untouched.
    """
    box = trim_box(*image.size, max_aspect_ratio)
    return image if box is None else image.crop(box)


def to_pixels(image: Image.Image, config: Preprocessing) -> np.ndarray:
    """One RGB image -> the model's view of it as uint8 pixels, shape (image_size, image_size, 3).

    This is what the service hands to the model process: 4x fewer bytes than the normalised float32 input.
    """
    return np.asarray(resize_and_crop(image, config).convert("RGB"), dtype=np.uint8)


def normalize_pixels(pixels: np.ndarray, config: Normalization) -> np.ndarray:
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


def draft_min_size(config: Preprocessing) -> int | None:
    """The decoder's `min_size`: decode large JPEGs at reduced scale down to `resize_size` when the model's
    preprocessing says `jpeg_draft`, else (None) at full scale."""
    return config.resize_size if config.jpeg_draft else None


def bytes_to_pixels(data: bytes, config: Preprocessing, limits: ImageLimits) -> np.ndarray:
    """Untrusted image bytes -> uint8 pixels (S, S, 3), exactly as the service does it: the hardened
    decoder (large JPEGs decoded at reduced scale, never below `resize_size`, when `config.jpeg_draft`), then
    resize and centre crop. `limits` only refuse images, never change pixels. `normalize_pixels` makes the
    model input of them."""
    return to_pixels(decode_image(data, limits, min_size=draft_min_size(config)), config)


def bytes_to_input(data: bytes, config: Preprocessing, limits: ImageLimits) -> np.ndarray:
    """Untrusted image bytes -> normalised float32 model input (3, S, S): `bytes_to_pixels`, then
    `normalize_pixels` (what the service's model process does to the pixels it receives)."""
    return normalize_pixels(bytes_to_pixels(data, config, limits)[None], config)[0]


@dataclass(frozen=True)
class PhotoView:
    """Where the model's view lies on the original photo: `crop_box` in its pixels, and its `size` (width,
    height), both as the photo is displayed (EXIF orientation applied), whatever scale it was decoded at."""

    crop_box: Box
    size: tuple[int, int]


def bytes_to_pixels_and_view(data: bytes, config: Preprocessing, limits: ImageLimits
                             ) -> tuple[np.ndarray, PhotoView]:
    """`bytes_to_pixels` (the same pixels), and where they lie on the original photo (for heatmaps)."""
    image, full_size = decode_image_sized(data, limits, min_size=draft_min_size(config))
    left, top, right, bottom = crop_box(*image.size, config)
    scale_x, scale_y = full_size[0] / image.width, full_size[1] / image.height  # a reduced-scale JPEG decode
    box = (left * scale_x, top * scale_y, right * scale_x, bottom * scale_y)
    return to_pixels(image, config), PhotoView(crop_box=box, size=full_size)
