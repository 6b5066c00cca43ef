"""The one preprocessing definition: equal to torchvision's eval transform, safe on extreme shapes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from inference.decode import ImageLimits, decode_image
from inference.preprocess import (
    Preprocessing,
    bytes_to_pixels,
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


def test_jpeg_draft_round_trips_and_a_dict_without_it_is_every_earlier_model() -> None:
    """Every model stored before `jpeg_draft` existed was evaluated with it on: its dict reads as on, and the
    default's dict is still exactly that dict (recipes in run checkpoints are matched by equality)."""
    earlier = {"image_size": 224, "resize_size": 256, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
               "rule": "resize shorter side (bilinear), center crop, RGB /255, (x-mean)/std, NCHW float32"}
    assert Preprocessing.from_dict(earlier) == Preprocessing() and Preprocessing().jpeg_draft
    assert Preprocessing().to_dict() == earlier
    off = Preprocessing(jpeg_draft=False)
    assert off.to_dict()["jpeg_draft"] is False and Preprocessing.from_dict(off.to_dict()) == off
    with pytest.raises(ValueError, match="jpeg_draft must be true or false"):
        Preprocessing.from_dict({**earlier, "jpeg_draft": "false"})


def test_the_preprocessing_alone_says_whether_a_large_jpeg_is_decoded_at_reduced_scale() -> None:
    buffer = io.BytesIO()
    photo_like(1600, 1200).save(buffer, "JPEG", quality=90)
    data, limits = buffer.getvalue(), ImageLimits(max_bytes=1 << 24, max_pixels=1 << 24, formats=("JPEG",))
    draft = bytes_to_pixels(data, Preprocessing(), limits)
    full = bytes_to_pixels(data, Preprocessing(jpeg_draft=False), limits)
    assert np.array_equal(draft, to_pixels(decode_image(data, limits, min_size=256), Preprocessing()))
    assert np.array_equal(full, to_pixels(decode_image(data, limits), Preprocessing()))
    assert not np.array_equal(draft, full)


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
