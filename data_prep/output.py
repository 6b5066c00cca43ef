"""Write the dataset atomically: build it in a hidden staging folder beside --out, rename it into place
only when complete. An interrupted run leaves no folder that looks like a finished dataset, and a re-run
replaces the previous dataset only at the very end."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from data_prep.common import DataPrepError

MANIFEST_NAME = "manifest.csv"
REPORT_FOLDER = "report"
SUMMARY_NAME = "summary.json"


def is_previous_dataset(folder: Path) -> bool:
    """True for a folder this tool wrote (so replacing it loses nothing the user made)."""
    return (folder / MANIFEST_NAME).is_file() and (folder / REPORT_FOLDER / SUMMARY_NAME).is_file()


def check_output_location(out: Path, sources: Sequence[Path]) -> None:
    """Refuse an --out that would write into, or replace, a source tree or someone else's folder."""
    target = out.resolve()
    for source in sources:
        root = source.resolve()
        if target == root or root in target.parents:
            raise DataPrepError(f"--out {out} is inside the source {source}: the source tree is never modified")
        if target in root.parents:
            raise DataPrepError(f"--out {out} contains the source {source}: replacing it would delete the source")
    if out.exists() and not out.is_dir():
        raise DataPrepError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not is_previous_dataset(out):
        raise DataPrepError(f"--out {out} is a non-empty folder that data_prep did not write; refusing to replace it")


@contextmanager
def staging_folder(out: Path) -> Iterator[Path]:
    """A fresh hidden folder beside `out`, deleted on the way out unless `publish` moved it into place."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        staging.chmod(0o755)  # mkdtemp makes it private; the dataset is not
    except OSError as error:
        raise DataPrepError(f"--out {out}: cannot write there ({error.strerror or error})") from None
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, out: Path) -> None:
    """Move the finished staging folder to `out`; a previous dataset there is swapped out, then deleted."""
    if not out.exists():
        os.rename(staging, out)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, trash / out.name)
    os.rename(staging, out)
    shutil.rmtree(trash, ignore_errors=True)
