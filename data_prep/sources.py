"""Extract: find the candidate images of SUN RGB-D and of extra ImageFolder trees.

Every candidate gets a file name for the output tree derived from its source and relative path, so
names never collide across sensors (kv1/kv2/realsense/xtion) or sources, and never depend on the order
in which the file system lists files.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from data_prep.common import CLASSES, OTHER, SUNRGBD_SOURCE, DataPrepError, progress

SCENE_FILE = "scene.txt"
NAME_SEPARATOR = "__"
MAX_NAME_LENGTH = 180
_UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Candidate:
    """One image that may end up in the dataset (or a scene that has none: `path` is None)."""

    source: str
    source_path: str  # POSIX path relative to the source root: what the manifest shows
    label: str
    path: Path | None  # the file to read; None for a SUN RGB-D scene without an image
    output_name: str = ""  # unique file name in the output tree, set by `assign_output_names`
    scene: str = ""  # the scene type: the label for a room, the scene folder for an --other photo


@dataclass
class SourceScan:
    """What one source contributed, with the counts the report needs."""

    source: str
    candidates: list[Candidate]
    scenes_by_label: dict[str, int] = field(default_factory=dict)  # SUN RGB-D only: every label seen
    scenes_with_several_images: int = 0  # SUN RGB-D only
    ignored_folders: list[str] = field(default_factory=list)  # extra trees only: not one of CLASSES
    other: bool = False  # an --other tree: every photo is labelled OTHER, its folder is the scene


def normalise_label(text: str) -> str:
    """'Living Room\\n' -> 'living_room': scene.txt labels and extra-tree folder names compare equal."""
    return re.sub(r"[\s-]+", "_", text.strip().lower())


def require_folder(path: Path, option: str) -> None:
    """Fail with one clear line unless `path` is an existing, non-empty folder."""
    if not path.exists():
        raise DataPrepError(f"{option} {path}: no such folder")
    if not path.is_dir():
        raise DataPrepError(f"{option} {path}: not a folder")
    if not any(path.iterdir()):
        raise DataPrepError(f"{option} {path}: the folder is empty")


def _visible_files(folder: Path) -> list[str]:
    """Sorted names of the non-hidden regular files in `folder` (none if it does not exist)."""
    if not folder.is_dir():
        return []
    return sorted(entry.name for entry in os.scandir(folder)
                  if entry.is_file() and not entry.name.startswith("."))


def find_scene_folders(root: Path) -> list[Path]:
    """Every folder under `root`, at any depth, that holds a scene.txt (sorted).

    A scene folder is not searched further: its image/, depth/, annotation*/ folders hold no scenes,
    and skipping them keeps the walk fast on the full 6.4 GB download.
    """
    scenes = []
    for folder, subfolders, files in progress(os.walk(root), desc="Finding scenes", unit=" folders", leave=False):
        if SCENE_FILE in files:
            scenes.append(Path(folder))
            subfolders.clear()
    return sorted(scenes)


def read_scene_label(scene: Path) -> str:
    """The scene's label: scene.txt's text, stripped and lower-cased."""
    return normalise_label((scene / SCENE_FILE).read_bytes().decode("utf-8", errors="replace"))


def scan_sunrgbd(root: Path) -> SourceScan:
    """Candidates of the four classes: each scene's first image (sorted) in image/, or a no-image row."""
    require_folder(root, "--sunrgbd")
    scenes = find_scene_folders(root)
    if not scenes:
        raise DataPrepError(f"--sunrgbd {root}: no {SCENE_FILE} found at any depth; is this the SUN RGB-D folder?")
    labels: Counter[str] = Counter()
    candidates, several_images = [], 0
    for scene in scenes:
        label = read_scene_label(scene)
        labels[label] += 1
        if label not in CLASSES:
            continue
        images = _visible_files(scene / "image")
        several_images += len(images) > 1
        relative = scene.relative_to(root).as_posix()
        if images:
            first = f"{relative}/image/{images[0]}"
            candidates.append(Candidate(SUNRGBD_SOURCE, first, label, root / first, scene=label))
        else:
            candidates.append(Candidate(SUNRGBD_SOURCE, relative, label, None, scene=label))
    if not candidates:
        found = ", ".join(f"{label} ({count})" for label, count in labels.most_common(5))
        raise DataPrepError(f"--sunrgbd {root}: no scene is labelled {', '.join(CLASSES)} "
                            f"(most common labels: {found})")
    return SourceScan(SUNRGBD_SOURCE, candidates, dict(sorted(labels.items())), several_images)


def extra_source_name(root: Path) -> str:
    """An extra tree's source name is its folder name, e.g. places365."""
    return _safe(root.resolve().name) or "extra"


def other_source_name(root: Path) -> str:
    """An --other tree's source name: other_ + its folder name, e.g. other_places365 (apart from the rooms'
    places365)."""
    return f"{OTHER}_{_safe(root.resolve().name) or 'extra'}"


def _files_under(folder: Path) -> list[Path]:
    """Every visible file under `folder`, at any depth (hidden folders skipped)."""
    found = []
    for directory, subfolders, files in os.walk(folder):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        found += [Path(directory, name) for name in files if not name.startswith(".")]
    return found


def _subfolders(root: Path) -> list[Path]:
    return sorted(entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def scan_extra(root: Path) -> SourceScan:
    """Candidates of an ImageFolder tree `<class>/**/<file>`: every visible file under a class folder."""
    require_folder(root, "--extra")
    source = extra_source_name(root)
    class_folders = _subfolders(root)
    ignored = [folder.name for folder in class_folders if normalise_label(folder.name) not in CLASSES]
    candidates = []
    for folder in class_folders:
        label = normalise_label(folder.name)
        if label in CLASSES:
            candidates += [Candidate(source, path.relative_to(root).as_posix(), label, path, scene=label)
                           for path in _files_under(folder)]
    if not candidates:
        raise DataPrepError(f"--extra {root}: no files in folders named {', '.join(CLASSES)}")
    candidates.sort(key=lambda candidate: candidate.source_path)
    return SourceScan(source, candidates, ignored_folders=ignored)


def scan_other(root: Path) -> SourceScan:
    """Candidates of a scene tree `<scene>/**/<file>` of photos that are none of the rooms: label OTHER, and
    the scene folder kept as the photo's scene (the split and the evaluation read it)."""
    require_folder(root, "--other")
    source = other_source_name(root)
    candidates = [Candidate(source, path.relative_to(root).as_posix(), OTHER, path, scene=normalise_label(folder.name))
                  for folder in _subfolders(root) for path in _files_under(folder)]
    if not candidates:
        raise DataPrepError(f"--other {root}: no files in scene folders (expected <scene>/*.jpg)")
    candidates.sort(key=lambda candidate: candidate.source_path)
    return SourceScan(source, candidates, other=True)


def _safe(text: str) -> str:
    """File-name-safe version of one path component."""
    return _UNSAFE_CHARACTERS.sub("_", text).strip("_")


def _short_digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]


def readable_name(candidate: Candidate) -> str:
    """source + relative path, e.g. sunrgbd__kv1__NYUdata__NYU0799.jpg, places365__bedroom__00001.jpg.

    A SUN RGB-D image is named by its scene folder (the image's own name repeats it or is a frame number).
    """
    path = PurePosixPath(candidate.source_path)
    if candidate.source == SUNRGBD_SOURCE:
        scene = path if candidate.path is None else path.parents[1]  # drop image/<file>
        stem_parts, suffix = scene.parts, path.suffix if candidate.path is not None else ""
    else:
        stem_parts, suffix = (*path.parent.parts, path.stem), path.suffix
    stem = NAME_SEPARATOR.join(_safe(part) for part in (candidate.source, *stem_parts))
    return stem + _safe(suffix)


def assign_output_names(candidates: list[Candidate]) -> list[Candidate]:
    """Give every candidate a unique output file name.

    Names are readable; in the rare case that sanitising makes two equal (ignoring case, for case-insensitive
    file systems) or a name is too long, a digest of source + relative path is appended.
    """
    names = [readable_name(candidate) for candidate in candidates]
    taken = Counter(name.casefold() for name in names)
    result = []
    for candidate, name in zip(candidates, names, strict=True):
        if taken[name.casefold()] > 1 or len(name) > MAX_NAME_LENGTH:
            stem, suffix = os.path.splitext(name)
            digest = _short_digest(f"{candidate.source}/{candidate.source_path}")
            name = f"{stem[:MAX_NAME_LENGTH - 40]}{NAME_SEPARATOR}{digest}{suffix}"
        result.append(replace(candidate, output_name=name))
    final = Counter(candidate.output_name.casefold() for candidate in result)
    clashes = [name for name, count in final.items() if count > 1]
    if clashes:
        raise DataPrepError(f"two inputs map to the same output name {clashes[0]!r}; are two sources the same folder?")
    return result
