"""decode_image: what comes out for every kind of image, and the stable code for every refusal."""

from __future__ import annotations

import tracemalloc
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from inference.config import KernelConfig
from inference.decode import ImageLimits, decode_image, high_bit_depth_to_l
from inference.errors import InputError, http_status
from testkit.images import (
    animated_gif,
    encode,
    exif_rotated_jpeg,
    gif_with_huge_screen,
    jpeg_with_huge_header,
    noisy_image,
    png_bomb,
    png_with_huge_header,
    sixteen_bit_png,
    solid_jpeg,
    truncated,
)

LIMITS = KernelConfig().image_limits()  # the service's defaults


def refusal(data: bytes, limits: ImageLimits = LIMITS) -> InputError:
    with pytest.raises(InputError) as caught:
        decode_image(data, limits)
    assert 400 <= http_status(caught.value.code) < 500
    return caught.value


def close_to(pixel: tuple[int, ...], expected: tuple[int, int, int], tolerance: int = 6) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected))


# ---- accepted images come out as 8-bit RGB that looks right ------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_allowed_formats_decode_to_rgb(fmt: str) -> None:
    image = decode_image(encode(Image.new("RGB", (50, 30), (200, 30, 30)), fmt), LIMITS)
    assert image.mode == "RGB" and image.size == (50, 30)
    assert close_to(image.getpixel((10, 10)), (200, 30, 30), tolerance=12)


def test_exif_orientation_is_applied() -> None:
    image = decode_image(exif_rotated_jpeg(), LIMITS)
    assert image.size == (20, 40)  # rotated: portrait now
    assert close_to(image.getpixel((10, 5)), (255, 0, 0), 20)  # the red left half is on top
    assert close_to(image.getpixel((10, 35)), (0, 0, 255), 20)


def test_cmyk_jpeg_is_converted_to_rgb() -> None:
    image = decode_image(encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"), LIMITS)
    assert image.mode == "RGB" and close_to(image.getpixel((5, 5)), (255, 0, 0))


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    row = np.asarray(decode_image(sixteen_bit_png(), LIMITS))[0, :, 0]
    assert row[0] == 0 and row[-1] == 255
    assert 120 <= row[len(row) // 2] <= 135  # the middle of the ramp is mid-gray, not white


@pytest.mark.parametrize("mode, values, expected", [
    ("I", [0, 100, 255], [0, 100, 255]),  # fits 0..255: read as 8-bit
    ("I", [0, 257, 65535], [0, 1, 255]),  # fits 0..65535: read as 16-bit
    ("I", [0, 500_000, 1_000_000], [0, 128, 255]),  # larger: scaled by its maximum
    ("F", [0.0, 127.5, 255.0], [0, 128, 255]),
    ("I;16", [0, 32896, 65535], [0, 128, 255]),
])
def test_high_bit_depth_values_are_scaled_to_8_bit(mode: str, values: list[float], expected: list[int]) -> None:
    image = Image.new(mode, (len(values), 1))
    for x, value in enumerate(values):
        image.putpixel((x, 0), value)
    converted = high_bit_depth_to_l(image)
    assert converted.mode == "L" and np.asarray(converted)[0].tolist() == expected


@pytest.mark.parametrize("width, height", [(4000, 4000), (16_000_000, 1)])
def test_high_bit_depth_conversion_stays_near_the_8_bit_size(width: int, height: int) -> None:
    data = png_bomb(width, height, bit_depth=16)  # ~30 KB of zeros, 16 M pixels of 16-bit gray
    tracemalloc.start()  # sees NumPy's allocations (Pillow's own image memory is not traced)
    try:
        image = decode_image(data, LIMITS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert image.size == (width, height) and image.getpixel((0, 0)) == (0, 0, 0)
    assert peak < 1.5 * width * height, f"{peak / 1e6:.0f} MB"  # a float64 copy alone is 8 bytes per pixel


def test_transparency_is_composited_on_white() -> None:
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    half = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    assert decode_image(encode(transparent, "PNG"), LIMITS).getpixel((0, 0)) == (255, 255, 255)
    assert close_to(decode_image(encode(half, "PNG"), LIMITS).getpixel((0, 0)), (127, 127, 127), 2)
    assert decode_image(encode(Image.new("LA", (4, 4), (10, 0)), "PNG"), LIMITS).getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparent_index_is_composited() -> None:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    image.paste(0, (0, 0, 4, 8))
    decoded = decode_image(encode(image, "PNG", transparency=0), LIMITS)
    assert decoded.getpixel((1, 1)) == (255, 255, 255) and decoded.getpixel((6, 1)) == (0, 200, 0)


def test_grayscale_and_bilevel_become_rgb() -> None:
    assert decode_image(encode(Image.new("L", (4, 4), 77), "PNG"), LIMITS).getpixel((0, 0)) == (77, 77, 77)
    assert decode_image(encode(Image.new("1", (4, 4), 1), "PNG"), LIMITS).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_images_give_their_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))]
    data = animated_gif((255, 0, 0), (0, 0, 255)) if fmt == "GIF" else encode(
        frames[0], fmt, save_all=True, append_images=frames[1:], **({"lossless": True} if fmt == "WEBP" else {}))
    assert close_to(decode_image(data, LIMITS).getpixel((5, 5)), (255, 0, 0))


def test_one_pixel_image_is_fine() -> None:
    assert decode_image(encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), LIMITS).size == (1, 1)


@pytest.mark.parametrize("size", [(1, 10000), (10000, 1), (30, 400), (200, 1000)])
def test_elongated_images_decode_whole(size: tuple[int, int]) -> None:
    # preprocess.trim_long_side centre-crops them to 2:1 before resizing; decoding keeps every pixel
    assert decode_image(encode(Image.new("RGB", size), "PNG"), LIMITS).size == size


def test_large_jpegs_can_decode_at_reduced_scale_but_never_below_min_size() -> None:
    big = encode(noisy_image((1600, 1200)), "JPEG")
    assert decode_image(big, LIMITS).size == (1600, 1200)
    assert decode_image(big, LIMITS, min_size=256).size == (400, 300)  # 1/4 scale: the shorter side stays >= 256
    assert decode_image(big, LIMITS, min_size=700).size == (1600, 1200)  # 1/2 would be 600 < 700
    assert decode_image(encode(noisy_image((1600, 1200)), "PNG"), LIMITS, min_size=256).size == (1600, 1200)
    assert decode_image(encode(noisy_image((416, 416)), "JPEG"), LIMITS, min_size=256).size == (416, 416)


# ---- refusals ----------------------------------------------------------------------------------------


def test_empty_data() -> None:
    assert refusal(b"").code == "empty_image"


def test_too_many_bytes() -> None:
    assert refusal(solid_jpeg((1, 2, 3)), replace(LIMITS, max_bytes=100)).code == "image_too_large"


@pytest.mark.parametrize("make", [lambda: png_bomb(8000, 8000), png_with_huge_header, jpeg_with_huge_header,
                                  gif_with_huge_screen], ids=["png-bomb", "png-header", "jpeg-header", "gif-screen"])
def test_too_many_pixels_is_refused_from_the_header(make) -> None:
    data = make()
    assert len(data) < 200_000  # small files: the check cannot have come from the byte limit
    assert refusal(data).code == "image_too_many_pixels"


def test_pixel_limit_is_exact() -> None:
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    assert decode_image(data, replace(LIMITS, max_pixels=10_000)).size == (100, 100)
    assert refusal(data, replace(LIMITS, max_pixels=9_999)).code == "image_too_many_pixels"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_files_are_corrupt(fmt: str) -> None:
    assert refusal(truncated(encode(noisy_image(), fmt))).code == "corrupt_image"


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "ICO"])
def test_known_but_not_allowed_formats(fmt: str) -> None:
    error = refusal(encode(Image.new("RGB", (16, 16)), fmt))
    assert error.code == "unsupported_image_format" and fmt in error.message


def test_format_allow_list_is_configurable() -> None:
    png = encode(Image.new("RGB", (4, 4)), "PNG")
    assert refusal(png, replace(LIMITS, formats=("JPEG",))).code == "unsupported_image_format"


@pytest.mark.parametrize("data", [
    b"hello, I am text",
    b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>",
    b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",
    b"<html><body><img src='data:image/jpeg;base64,/9j/4AAQ'></body></html>",
    b"\x00" * 1000,
], ids=["text", "svg", "pdf", "html-polyglot", "zeros"])
def test_content_that_is_not_an_image(data: bytes) -> None:
    assert refusal(data).code == "not_an_image"


def test_gif_javascript_polyglot_is_refused() -> None:
    assert refusal(b"GIF89a/*\x00\x00*/=alert(document.domain)//;").code in ("corrupt_image", "not_an_image")


def test_jpeg_with_trailing_payload_decodes_as_the_jpeg() -> None:
    polyglot = solid_jpeg((255, 0, 0), (64, 64)) + b"PK\x03\x04" + b"<script>alert(1)</script>" * 10
    assert close_to(decode_image(polyglot, LIMITS).getpixel((5, 5)), (255, 0, 0))


def test_corrupt_header_of_an_allowed_format() -> None:
    assert refusal(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40).code == "corrupt_image"
