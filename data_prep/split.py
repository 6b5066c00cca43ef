"""Split: 70/20/10 per class with split-folders and a fixed seed; "other" scene types held out whole.

split-folders sorts each class's files by name before its seeded shuffle, and our file names depend only
on source + relative path, so the split is the same whatever order the file system lists files in.

Photos of the --other trees are split two ways (see `KNOWN_OTHER_SCENES`): a known scene type (dining room,
entrance hall) photo by photo, stratified per scene like the rooms; every other scene type whole, so that
val and test hold scene types that training never saw (leave-scenes-out) and their scores predict unseen
scenes rather than unseen photos of seen ones.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import splitfolders

from data_prep.common import OTHER, SPLIT_RATIO, SPLITS, DataPrepError, dataset_classes, progress
from data_prep.sources import Candidate

# The kept images are copied (bytes only, never re-encoded) into staging/.pool/<group>/<name>, then
# split-folders *moves* them into train/val/test: one copy of the data and no links, which are slow to
# create and delete on some file systems.
POOL_FOLDER = ".pool"
SCENE_GROUP_SEPARATOR = "__"  # pool group of a known other scene: other__dining_room


def scene_splits(scenes: set[str], seed: int) -> dict[str, str]:
    """Whole scene types to splits, 70/20/10 by count of scenes, from a seeded shuffle of the sorted names."""
    order = sorted(scenes)
    random.Random(seed).shuffle(order)
    train_end = round(SPLIT_RATIO[0] * len(order))
    val_end = train_end + round(SPLIT_RATIO[1] * len(order))
    return {scene: SPLITS[0] if i < train_end else SPLITS[1] if i < val_end else SPLITS[2]
            for i, scene in enumerate(order)}


def pool_group(candidate: Candidate, known_scenes: tuple[str, ...]) -> str | None:
    """The split-folders group a photo is split in (its class, or other__<scene>); None: split by whole scene."""
    if candidate.label != OTHER:
        return candidate.label
    return f"{OTHER}{SCENE_GROUP_SEPARATOR}{candidate.scene}" if candidate.scene in known_scenes else None


def split_kept_images(kept: list[Candidate], staging: Path, seed: int,
                      known_scenes: tuple[str, ...] = ()) -> dict[str, str]:
    """Copy the original bytes of `kept` into staging/{train,val,test}/<class>/; return output name -> split."""
    if not kept:
        raise DataPrepError("no usable image is left after cleaning; nothing to split")
    pool = staging / POOL_FOLDER
    groups = {candidate.output_name: pool_group(candidate, known_scenes) for candidate in kept}
    whole_scenes = scene_splits({c.scene for c in kept if groups[c.output_name] is None}, seed)
    for group in sorted({group for group in groups.values() if group is not None}):
        (pool / group).mkdir(parents=True)
    classes = dataset_classes(candidate.label for candidate in kept)
    for split in SPLITS:
        for label in classes:
            (staging / split / label).mkdir(parents=True, exist_ok=True)  # every class folder, even when empty
    for candidate in progress(kept, desc="Copying kept images", unit=" img"):
        assert candidate.path is not None
        group = groups[candidate.output_name]
        folder = pool / group if group is not None else staging / whole_scenes[candidate.scene] / OTHER
        shutil.copyfile(candidate.path, folder / candidate.output_name)
    if pool.exists():
        splitfolders.ratio(str(pool), output=str(staging), seed=seed, ratio=SPLIT_RATIO, move=True)
        shutil.rmtree(pool)  # only the emptied group folders are left
    split_of = {}
    for split in SPLITS:
        for scene_group in (staging / split).glob(f"{OTHER}{SCENE_GROUP_SEPARATOR}*"):
            for name in os.listdir(scene_group):
                os.replace(scene_group / name, staging / split / OTHER / name)
            scene_group.rmdir()
        for label in classes:
            split_of.update((name, split) for name in os.listdir(staging / split / label))
    assert len(split_of) == len(kept), "split-folders lost or duplicated files"
    return split_of
