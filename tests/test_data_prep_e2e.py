"""data_prep end to end on the shared full-scale SUN RGB-D replica + extra trees (slow: `pytest -m e2e`).

The planted faults are found here by independent means (raw bytes, full-size decode, byte-identical
copies), not by data_prep's own code, and every one of them must get the right decision."""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import CLASSES, prepare_dataset
from data_prep.manifest import read_manifest
from tests.data_prep_fixtures import tree_digest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SUNRGBD = SHARED / "SUNRGBD"
EXTRAS = [SHARED / "extra" / "places365", SHARED / "extra" / "house_rooms"]

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not SUNRGBD.is_dir(), reason=f"shared data not found at {SHARED}")]

# From the replica's README: scene folders per class, before any cleaning.
REAL_SCENE_COUNTS = {"bedroom": 1082, "bathroom": 623, "living_room": 524, "kitchen": 497}
# A planted same-class copy that was re-encoded (different bytes): only the perceptual hash can catch it.
REENCODED_COPY = ("kv1/NYUdata/NYU0158/image/NYU0158.jpg",
                  "xtion/sun3ddata/home_ac/home_ac_scan2_2012_aug_22/0001551-000883924988/image/0007485.jpg")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("e2e")
    for name in ("first", "second"):
        prepare_dataset(base / name, sunrgbd=SUNRGBD, extras=EXTRAS)
    return base / "first", base / "second"


@pytest.fixture(scope="module")
def sun_rows(runs) -> dict[str, dict[str, str]]:
    return {row["source_path"]: row for row in read_manifest(runs[0] / "manifest.csv") if row["source"] == "sunrgbd"}


def test_real_per_class_scene_counts_before_cleaning(sun_rows):
    counted = {label: sum(row["class"] == label for row in sun_rows.values()) for label in CLASSES}
    assert counted == REAL_SCENE_COUNTS


def test_two_runs_give_byte_identical_trees(runs):
    first, second = (tree_digest(run) for run in runs)
    assert first == second
    assert sum(name.startswith(("train/", "val/", "test/")) for name in first) > 11_000


def image_files(sun_rows: dict[str, dict[str, str]]) -> dict[str, bytes]:
    """source_path -> raw bytes of every SUN RGB-D candidate that has a file."""
    return {path: (SUNRGBD / path).read_bytes() for path, row in sun_rows.items() if row["reason"] != "no_image"}


def reasons_for(sun_rows: dict[str, dict[str, str]], reason: str) -> set[str]:
    return {path for path, row in sun_rows.items() if row["reason"] == reason}


def test_broken_files_are_caught(sun_rows):
    files = image_files(sun_rows)
    not_jpeg = {path for path, data in files.items() if not data.startswith(b"\xff\xd8")}
    truncated = {path for path, data in files.items()
                 if data.startswith(b"\xff\xd8") and not data.rstrip(b"\0").endswith(b"\xff\xd9")}
    assert (len(not_jpeg), len(truncated)) == (2, 8)  # the replica's planted faults
    assert reasons_for(sun_rows, "not_image") == not_jpeg
    assert reasons_for(sun_rows, "corrupt") == truncated


def test_nearly_black_frames_are_caught(sun_rows):
    files = image_files(sun_rows)
    decodable = [path for path, row in sun_rows.items()
                 if path in files and row["reason"] not in ("not_image", "corrupt")]
    black = set()
    for path in decodable:
        with Image.open(SUNRGBD / path) as image:  # full-size decode, unlike data_prep's reduced one
            if np.asarray(image.convert("L"), dtype=np.float32).mean() < 0.06 * 255:
                black.add(path)
    assert len(black) == 9
    assert reasons_for(sun_rows, "dark") == black


def test_scenes_without_or_with_several_images(sun_rows):
    scenes = {path.rsplit("/image/", 1)[0] if "/image/" in path else path: path for path in sun_rows}
    empty = {scene for scene in scenes
             if not (SUNRGBD / scene / "image").is_dir() or not os.listdir(SUNRGBD / scene / "image")}
    assert len(empty) == 3 and reasons_for(sun_rows, "no_image") == empty
    several = [scene for scene in scenes
               if (SUNRGBD / scene / "image").is_dir() and len(os.listdir(SUNRGBD / scene / "image")) > 1]
    assert len(several) == 5
    for scene in several:
        assert scenes[scene] == f"{scene}/image/{sorted(os.listdir(SUNRGBD / scene / 'image'))[0]}"


def test_copied_photos_are_caught_within_and_across_classes(sun_rows):
    files = image_files(sun_rows)
    copies: dict[str, list[str]] = defaultdict(list)
    for path, data in files.items():
        if sun_rows[path]["reason"] not in ("not_image", "corrupt", "dark"):
            copies[hashlib.sha256(data).hexdigest()].append(path)
    groups = [paths for paths in copies.values() if len(paths) > 1]
    cross_class = [paths for paths in groups if len({sun_rows[path]["class"] for path in paths}) > 1]
    same_class = [paths for paths in groups if len({sun_rows[path]["class"] for path in paths}) == 1]
    assert (len(cross_class), len(same_class)) == (5, 1)
    for paths in cross_class:
        assert {sun_rows[path]["reason"] for path in paths} == {"label_conflict"}, paths
    for paths in [*same_class, list(REENCODED_COPY)]:
        decisions = sorted(sun_rows[path]["decision"] for path in paths)
        assert decisions == ["dropped", "kept"], paths
        assert {sun_rows[path]["reason"] for path in paths} == {"", "duplicate"}, paths
