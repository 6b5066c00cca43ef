"""Small on-disk fixtures for the data_prep tests: a SUN RGB-D-like tree and an extra ImageFolder tree,
with one planted case per decision. Each builder returns what the manifest must say about every file:
{(source, source_path): reason}, where "" means kept."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep import CLASSES
from testkit.images import jpeg_bytes, png_bytes

FILLERS_PER_CLASS = 10  # ordinary good scenes per class: enough for a 7/2/1 split


def photo(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A distinct 'photo': random coarse colour blocks, smoothly upscaled (stable under re-encoding)."""
    blocks = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize(size, Image.BICUBIC)


def write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def add_scene(root: Path, scene: str, label_text: str, images: dict[str, bytes] | None) -> None:
    """A scene folder: scene.txt with `label_text` verbatim, image/ with `images` (None: no image/ at all)."""
    write(root / scene / "scene.txt", label_text)
    write(root / scene / "intrinsics.txt", "1 0 0\n0 1 0\n0 0 1\n")
    if images is not None:
        (root / scene / "image").mkdir(parents=True, exist_ok=True)
        for name, data in images.items():
            write(root / scene / "image" / name, data)


def build_sunrgbd(root: Path) -> dict[tuple[str, str], str]:
    """A mini SUN RGB-D: fillers in every class plus one scene per fault; returns the expected reasons."""
    expected: dict[tuple[str, str], str] = {}

    def scene(path: str, label_text: str, images: dict[str, bytes] | None, reason: str) -> None:
        add_scene(root, path, label_text, images)
        if label_text.strip().lower() in CLASSES:
            expected[("sunrgbd", f"{path}/image/{sorted(images)[0]}" if images else path)] = reason

    for number, label in enumerate(CLASSES):
        for index in range(FILLERS_PER_CLASS):
            seed = 100 * number + index
            scene(f"kv1/NYUdata/NYU{seed:04d}", label, {f"NYU{seed:04d}.jpg": jpeg_bytes(photo(seed))}, "")
    conflict, duplicate, truncated = photo(9001), photo(9002), jpeg_bytes(photo(9003))
    scene("kv2/kinect2data/000001_upper_newline", "  Bedroom\n", {"0000001.jpg": jpeg_bytes(photo(1001))}, "")
    scene("xtion/sun3ddata/site_a/scan_1/0000001-000000000001", "living_room\n",
          {"0000001.jpg": jpeg_bytes(photo(1002))}, "")
    scene("realsense/lg/0001", "kitchen", {"0001.jpg": jpeg_bytes(photo(1003))}, "")
    scene("realsense/sa/0001", "kitchen", {"0001.jpg": jpeg_bytes(photo(1004))}, "")  # same scene name, other sensor
    scene("kv1/b3dodata/img_png", "bathroom", {"img_png.png": png_bytes(photo(1005))}, "")
    scene("kv1/b3dodata/img_grey", "bathroom", {"img_grey.jpg": jpeg_bytes(photo(1006).convert("L"))}, "")
    scene("kv1/b3dodata/img_two", "bedroom",
          {"a_first.jpg": jpeg_bytes(photo(1007)), "b_second.jpg": jpeg_bytes(photo(1008))}, "")
    scene("kv1/b3dodata/img_empty", "kitchen", {}, "no_image")
    scene("kv1/b3dodata/img_missing", "kitchen", None, "no_image")
    scene("kv1/b3dodata/img_truncated", "bedroom", {"t.jpg": truncated[: len(truncated) // 2]}, "corrupt")
    scene("kv1/b3dodata/img_truncated_tail", "living_room", {"t.jpg": truncated[:-2]}, "corrupt")
    scene("kv1/b3dodata/img_html", "bathroom", {"h.jpg": b"<html><body>404 Not Found</body></html>\n"}, "not_image")
    scene("kv1/b3dodata/img_empty_file", "bathroom", {"e.jpg": b""}, "not_image")
    scene("kv1/b3dodata/img_dark", "living_room", {"d.jpg": jpeg_bytes(photo(1009).point(lambda v: v * 0.05))}, "dark")
    grey = Image.new("RGB", (96, 72), (128, 128, 128))
    scene("kv1/b3dodata/img_blank", "living_room", {"b.jpg": jpeg_bytes(grey)}, "blank")
    scene("kv1/b3dodata/img_dup_a", "bedroom", {"a.jpg": jpeg_bytes(duplicate, quality=95)}, "")
    scene("xtion/sun3ddata/site_b/scan_9/0000009-000000000009", "bedroom",
          {"b.jpg": jpeg_bytes(duplicate, quality=60)}, "duplicate")  # re-encoded copy, same class
    scene("kv1/b3dodata/img_conflict_a", "bedroom", {"c.jpg": jpeg_bytes(conflict)}, "label_conflict")
    scene("kv2/align_kv2/conflict_b", "kitchen", {"c.jpg": jpeg_bytes(conflict)}, "label_conflict")
    scene("kv1/b3dodata/img_office", "office", {"o.jpg": jpeg_bytes(photo(1010))}, "")  # not a candidate
    return expected


def build_extra(root: Path, sunrgbd: Path) -> dict[tuple[str, str], str]:
    """An ImageFolder tree (source name = folder name) with cross-source duplicates and odd files."""
    source = root.name
    expected: dict[tuple[str, str], str] = {}

    def image(path: str, data: bytes, reason: str) -> None:
        write(root / path, data)
        expected[(source, path)] = reason

    for number, label in enumerate(CLASSES):
        for index in range(6):
            image(f"{label}/{index:05d}.jpg", jpeg_bytes(photo(5000 + 100 * number + index)), "")
    image("kitchen/sub/deeper.jpg", jpeg_bytes(photo(6001)), "")
    image("bedroom/notes.txt", b"not an image", "unsupported_extension")
    write(root / "bedroom" / ".DS_Store", b"\x00\x01")  # hidden: not a candidate
    write(root / "garage" / "car.jpg", jpeg_bytes(photo(6002)))  # not one of the classes: ignored
    # The same bytes as SUN RGB-D images: a same-class copy (SUN's copy stays) and a cross-class copy.
    image("bedroom/copy_of_sun.jpg", (sunrgbd / "kv1/NYUdata/NYU0100/image/NYU0100.jpg").read_bytes(), "duplicate")
    image("kitchen/cross_class.jpg", (sunrgbd / "kv1/NYUdata/NYU0000/image/NYU0000.jpg").read_bytes(), "label_conflict")
    return expected


def build_fixture(base: Path) -> tuple[Path, Path, dict[tuple[str, str], str]]:
    """(sunrgbd root, extra root, expected reasons) under `base`; the SUN RGB-D bathroom filler NYU0000
    becomes a label conflict because the extra tree has it as a kitchen."""
    sunrgbd, extra = base / "SUNRGBD", base / "extra" / "myrooms"
    expected = build_sunrgbd(sunrgbd)
    expected.update(build_extra(extra, sunrgbd))
    expected[("sunrgbd", "kv1/NYUdata/NYU0000/image/NYU0000.jpg")] = "label_conflict"
    return sunrgbd, extra, expected


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `root`: equal digests mean byte-identical trees."""
    return {path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


def tree_state(root: Path) -> dict[str, tuple[int, int, str]]:
    """relative path -> (size, mtime_ns, sha256) of every file and folder: proves a tree was not touched."""
    state = {}
    for directory, _, files in os.walk(root):
        for name in ["", *files]:
            path = Path(directory, name)
            info = path.stat()
            content = hashlib.sha256(path.read_bytes()).hexdigest() if name else ""
            state[path.relative_to(root).as_posix()] = (info.st_size, info.st_mtime_ns, content)
    return state
