"""The one preprocessing definition: equal to torchvision's eval transform, safe on extreme shapes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from inference.preprocess import (
    Preprocessing,
    normalize_pixels,
    preprocess,
    preprocess_batch,
    to_pixels,
    trim_long_side,
)


def photo_like(width: int, height: int) -> Image.Image:
    """A deterministic image with structure at every scale (gradients plus noise)."""
    rng = np.random.default_rng(width * 7 + height)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width, 1), y * 255 / max(height, 1), (x + y) % 256], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", [(256, 256), (416, 416), (640, 480), (480, 640), (1600, 1200), (900, 300),
                                  (2000, 400)])
def test_matches_torchvision_eval_transform(size: tuple[int, int]) -> None:
    transforms = pytest.importorskip("torchvision.transforms")

    config = Preprocessing()
    reference = transforms.Compose([transforms.Resize(config.resize_size), transforms.CenterCrop(config.image_size),
                                    transforms.ToTensor(), transforms.Normalize(config.mean, config.std)])
    image = photo_like(*size)
    expected = reference(image).numpy()
    actual = preprocess(image, config)
    assert actual.dtype == np.float32 and actual.shape == (3, 224, 224)
    assert np.abs(actual - expected).max() < 1e-5


@pytest.mark.parametrize("size", [(1, 100_000), (100_000, 1), (1, 1), (3, 10_000)])
def test_extreme_shapes_give_a_model_input_without_huge_intermediates(size: tuple[int, int]) -> None:
    assert preprocess(Image.new("RGB", size, "red"), Preprocessing()).shape == (3, 224, 224)


def test_trim_keeps_ordinary_photos_and_centres_strips() -> None:
    ordinary = photo_like(1920, 1080)
    assert trim_long_side(ordinary) is ordinary
    strip = trim_long_side(photo_like(100, 1000))
    assert strip.size == (100, 200)


def test_preprocessing_round_trips_through_model_metadata() -> None:
    config = Preprocessing(image_size=192, resize_size=220)
    assert Preprocessing.from_dict(config.to_dict()) == config
    assert preprocess_batch([], config).shape == (0, 3, 192, 192)


def test_normalize_pixels_is_exactly_the_float_arithmetic() -> None:
    """The lookup table must give the same bits as (v / 255 - mean) / std on every pixel."""
    config = Preprocessing()
    pixels = np.random.default_rng(3).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    expected = (pixels.astype(np.float32) / 255.0 - np.asarray(config.mean, dtype=np.float32)) / np.asarray(
        config.std, dtype=np.float32)
    actual = normalize_pixels(pixels, config)
    assert actual.dtype == np.float32 and actual.shape == (2, 3, 224, 224)
    assert np.array_equal(actual, expected.transpose(0, 3, 1, 2))


def test_pixels_then_normalisation_is_preprocess() -> None:
    config = Preprocessing()
    image = photo_like(640, 480)
    pixels = to_pixels(image, config)
    assert pixels.dtype == np.uint8 and pixels.shape == (224, 224, 3)
    assert np.array_equal(normalize_pixels(pixels[None], config)[0], preprocess(image, config))
