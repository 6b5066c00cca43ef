"""Split: 70/20/10 per class with split-folders and a fixed seed.

split-folders sorts each class's files by name before its seeded shuffle, and our file names depend only
on source + relative path, so the split is the same whatever order the file system lists files in.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import splitfolders

from data_prep.common import CLASSES, SPLIT_RATIO, SPLITS, DataPrepError, progress
from data_prep.sources import Candidate

# The kept images are copied (bytes only, never re-encoded) into staging/.pool/<class>/<name>, then
# split-folders *moves* them into train/val/test: one copy of the data and no links, which are slow to
# create and delete on some file systems.
POOL_FOLDER = ".pool"


def split_kept_images(kept: list[Candidate], staging: Path, seed: int) -> dict[str, str]:
    """Copy the original bytes of `kept` into staging/{train,val,test}/<class>/; return output name -> split."""
    if not kept:
        raise DataPrepError("no usable image is left after cleaning; nothing to split")
    pool = staging / POOL_FOLDER
    for label in sorted({candidate.label for candidate in kept}):
        (pool / label).mkdir(parents=True)
    for candidate in progress(kept, desc="Copying kept images", unit=" img"):
        assert candidate.path is not None
        shutil.copyfile(candidate.path, pool / candidate.label / candidate.output_name)
    splitfolders.ratio(str(pool), output=str(staging), seed=seed, ratio=SPLIT_RATIO, move=True)
    shutil.rmtree(pool)  # only the emptied class folders are left
    split_of = {}
    for split in SPLITS:
        for label in CLASSES:
            folder = staging / split / label
            folder.mkdir(parents=True, exist_ok=True)  # every class folder exists, even when empty
            split_of.update((name, split) for name in os.listdir(folder))
    assert len(split_of) == len(kept), "split-folders lost or duplicated files"
    return split_of
