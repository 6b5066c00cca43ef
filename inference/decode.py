"""Bytes -> RGB PIL image, hardened against hostile files. The one decoder of the project.

`decode_image(data, limits)` is what the service runs on every upload and download, and what training runs
when it evaluates the exported model, so both see the same pixels. It:

- refuses empty data and data over `max_bytes`;
- detects the format from the content (never from a file name or Content-Type) and accepts only the
  allow-listed formats;
- reads width x height from the header and refuses more than `max_pixels` *before* decoding
  (decompression bombs);
- optionally decodes large JPEGs at a reduced scale (`min_size`, see `decode_image`);
- decodes fully, so truncated or corrupt files fail here with `corrupt_image`, not later (this relies on
  Pillow's default `ImageFile.LOAD_TRUNCATED_IMAGES = False`; code that flips it globally weakens this);
- takes the first frame of animated images;
- applies the EXIF orientation;
- converts every mode to 8-bit RGB: alpha and palette transparency composited on white, CMYK via
  Pillow's conversion, 16-bit and 32-bit grayscale scaled down (not clipped to white), 1-bit expanded.

Elongated images come out whole: `inference.preprocess.trim_long_side` centre-crops them to 2:1 before
resizing (resizing the short side of a 1x10000 strip to 256 would otherwise allocate gigabytes).

Every refusal is an `inference.errors.InputError` with a stable code. The limits have no defaults here: they
are settings (RC_MAX_IMAGE_BYTES, RC_MAX_PIXELS, RC_IMAGE_FORMATS), declared once in `inference.config`, whose
`KernelConfig.image_limits()` builds an `ImageLimits`.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from inference.errors import ErrorCode, InputError

logger = logging.getLogger(__name__)

HIGH_BIT_DEPTH_TILE_PIXELS = 1 << 18  # pixels scaled at a time (2 MB of float64)

# Signatures of image formats that Pillow may know but that are not on the allow-list, so the answer can
# say "unsupported format" instead of "not an image".
_OTHER_IMAGE_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"qoif", "QOI"),
)


@dataclass(frozen=True)
class ImageLimits:
    """What `decode_image` accepts: `inference.config.KernelConfig.image_limits()` builds it from the settings."""

    max_bytes: int
    max_pixels: int
    formats: tuple[str, ...]  # Pillow's format names, upper case


def decode_image(data: bytes, limits: ImageLimits, min_size: int | None = None) -> Image.Image:
    """Decode untrusted image bytes to an 8-bit RGB image, or raise InputError (see module docstring).

    `min_size` lets JPEGs decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) as long as both sides
    stay >= min_size: about 4x less decode time for a 1600x1200 photo. The service passes the model's
    resize size; without it (training's evaluation) every image decodes at full size. Images whose
    sides are below 2 x min_size decode at full size either way.
    """
    return decode_image_sized(data, limits, min_size)[0]


def decode_image_sized(data: bytes, limits: ImageLimits, min_size: int | None = None
                       ) -> tuple[Image.Image, tuple[int, int]]:
    """`decode_image`, and the photo's full size (width, height) in the decoded image's orientation: larger
    than the image when a JPEG was decoded at reduced scale. Maps positions back onto the original photo."""
    check_byte_size(data, limits)
    image = open_image(data, limits)
    check_pixel_count(image, limits)
    full_size = image.size
    if min_size:
        image.draft(image.mode, (min_size, min_size))  # a no-op for formats other than JPEG
    load_first_frame(image)
    stored_size = image.size
    image = apply_exif_orientation(image)
    if image.size != stored_size:  # rotated by a quarter turn
        full_size = (full_size[1], full_size[0])
    return to_rgb(image), full_size


def check_byte_size(data: bytes, limits: ImageLimits) -> None:
    if not data:
        raise InputError(ErrorCode.EMPTY_IMAGE, "the image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise InputError(ErrorCode.IMAGE_TOO_LARGE,
                         f"the image is {len(data)} bytes; the limit is {limits.max_bytes} bytes")


def open_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Parse the header only, with Pillow restricted to the allowed formats."""
    formats = tuple(name.upper() for name in limits.formats)
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own bomb threshold; our pixel limit is checked right after.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError:  # Pillow's own, higher, limit tripped while parsing the header
        raise InputError(ErrorCode.IMAGE_TOO_MANY_PIXELS,
                         f"the image header declares more than the limit of {limits.max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise unrecognised_image(data, formats) from None
    except Exception as exc:  # noqa: BLE001 - any parser failure on hostile bytes is the input's fault
        raise InputError(ErrorCode.CORRUPT_IMAGE,
                         f"the image header cannot be read ({type(exc).__name__}: {exc})") from None


def unrecognised_image(data: bytes, formats: tuple[str, ...]) -> InputError:
    """Tell 'a format we do not take' from 'not an image at all' (and from a broken allowed file)."""
    allowed = ", ".join(formats)
    known = next((name for signature, name in _OTHER_IMAGE_SIGNATURES if data.startswith(signature)), None)
    if known is None and data[8:12] == b"WEBP" and data.startswith(b"RIFF"):
        known = "WEBP"
    if known is None:
        return InputError(ErrorCode.NOT_AN_IMAGE, f"the content is not an image in an accepted format ({allowed})")
    if known in formats:
        return InputError(ErrorCode.CORRUPT_IMAGE, f"the {known} header is corrupt")
    return InputError(ErrorCode.UNSUPPORTED_IMAGE_FORMAT, f"{known} images are not accepted; send one of: {allowed}")


def check_pixel_count(image: Image.Image, limits: ImageLimits) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise InputError(ErrorCode.CORRUPT_IMAGE, f"the image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise InputError(ErrorCode.IMAGE_TOO_MANY_PIXELS,
                         f"the image is {width}x{height} = {width * height} pixels; "
                         f"the limit is {limits.max_pixels} pixels")


def load_first_frame(image: Image.Image) -> None:
    """Decode the first frame fully; truncated or broken data fails here."""
    try:
        image.load()  # an animated image is positioned on its first frame after open()
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, ... on bad data
        raise InputError(ErrorCode.CORRUPT_IMAGE,
                         f"the image data is truncated or corrupt ({type(exc).__name__}: {exc})") from None


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF Orientation tag says. Broken EXIF is ignored, like browsers do.

    In place: otherwise Pillow returns a copy of every upright photo, a second full-size image in memory
    (+91 MiB peak for a 6000x4000 JPEG) and a memcpy per image."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as exc:  # noqa: BLE001
        logger.debug("ignoring unreadable EXIF orientation: %s", exc)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, keeping what the picture looks like."""
    try:
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            image = high_bit_depth_to_l(image)
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        if image.mode in ("LA", "PA", "La", "RGBa"):
            image = image.convert("RGBA")
        if image.mode == "RGBA":
            return composite_on_white(image)
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - exotic modes Pillow cannot convert
        raise InputError(ErrorCode.CORRUPT_IMAGE,
                         f"the image's colour mode {image.mode} cannot be converted to RGB ({exc})") from None


def high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit grayscale -> 8-bit 'L' by scaling the value range (Pillow's convert would clip to white).

    16-bit modes span 0..65535. 32-bit 'I'/'F' images (16-bit PNGs open as 'I') are read as 8-bit when
    their values fit 0..255, as 16-bit when they fit 0..65535, else scaled by their maximum.
    The scaling runs tile by tile: float64 copies of a whole 40 M pixel image would take gigabytes.
    """
    scale = 255.0 / value_range_top(image)
    width, height = image.size
    tile_width = min(width, HIGH_BIT_DEPTH_TILE_PIXELS)
    tile_height = max(1, HIGH_BIT_DEPTH_TILE_PIXELS // tile_width)
    out = np.empty((height, width), dtype=np.uint8)
    for top in range(0, height, tile_height):
        for left in range(0, width, tile_width):
            box = (left, top, min(width, left + tile_width), min(height, top + tile_height))
            tile = np.asarray(image.crop(box), dtype=np.float64)
            tile *= scale
            np.clip(tile, 0, 255, out=tile)
            out[box[1]:box[3], box[0]:box[2]] = np.round(tile, out=tile)
    return Image.fromarray(out)  # 2-D uint8 -> mode "L"


def value_range_top(image: Image.Image) -> float:
    """The value that becomes 255 (see `high_bit_depth_to_l`), read without copying the pixels."""
    if image.mode.startswith("I;16"):
        return 65535.0
    peak = float(image.getextrema()[1])
    if peak <= 255.0:
        return 255.0
    return 65535.0 if peak <= 65535.0 else peak


def composite_on_white(image: Image.Image) -> Image.Image:
    """Transparent pixels become white, like a browser page would show them."""
    background = Image.new("RGB", image.size, (255, 255, 255))
    background.paste(image, mask=image.getchannel("A"))
    return background

