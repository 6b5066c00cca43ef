"""Small images built in code rather than stored: plain colours, noise, EXIF rotation, animation, 16-bit, and
hostile files (decompression bombs, headers claiming huge sizes, truncations)."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    """`image` saved in Pillow format `fmt` ("JPEG", "PNG", ...), as bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def solid_jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (640, 480)) -> bytes:
    return encode(Image.new("RGB", size, colour), "JPEG", quality=92)


def write_solid_jpegs(folder: Path, colours: Mapping[str, tuple[int, int, int]]) -> dict[str, Path]:
    """One plain-colour JPEG per name under `folder` (`red` -> folder/red.jpg): what the tiny model tells apart."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {name: folder / f"{name}.jpg" for name in colours}
    for name, colour in colours.items():
        files[name].write_bytes(solid_jpeg(colour))
    return files


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    return encode(image, "JPEG", quality=quality)


def png_bytes(image: Image.Image) -> bytes:
    return encode(image, "PNG")


def truncated(data: bytes, keep: float = 0.6) -> bytes:
    """The first `keep` share of `data`: a download that broke off."""
    return data[: int(len(data) * keep)]


def noisy_image(size: tuple[int, int] = (320, 240), seed: int = 0) -> Image.Image:
    """Random pixels: compresses badly, so truncation really cuts image data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def exif_rotated_jpeg() -> bytes:
    """40x20 image, left half red, right half blue, EXIF Orientation 6 (display rotated 90 deg clockwise)."""
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image, "JPEG", exif=exif.tobytes(), quality=95)


def animated_gif(first: tuple[int, int, int], second: tuple[int, int, int]) -> bytes:
    frames = [Image.new("RGB", (64, 64), first), Image.new("RGB", (64, 64), second)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def sixteen_bit_png() -> bytes:
    """16-bit grayscale, every row a ramp 0..65535 (Pillow mode I;16)."""
    ramp = np.tile(np.linspace(0, 65535, 256), (64, 1)).astype(np.uint16)
    return encode(Image.fromarray(ramp), "PNG")


# ----------------------------------------------------------------------------------------------------
# Hostile files


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int, bit_depth: int = 8) -> bytes:
    """A real decompression bomb: a valid grayscale PNG of zeros, tiny compressed, huge decoded."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width * bit_depth // 8 + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_with_huge_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims enormous dimensions, with almost no data behind it."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def jpeg_with_huge_header(width: int = 65_000, height: int = 65_000) -> bytes:
    """A small JPEG whose SOF marker is patched to claim width x height."""
    data = bytearray(solid_jpeg((10, 200, 30), size=(16, 16)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_with_huge_screen(width: int = 65_535, height: int = 65_535) -> bytes:
    data = bytearray(encode(Image.new("P", (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)
