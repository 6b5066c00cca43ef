"""The data_prep job: extract -> clean -> split -> manifest + report, written atomically to --out."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.common import SUNRGBD_SOURCE, DataPrepError, Settings
from data_prep.dedup import group_near_duplicates, resolve_duplicates
from data_prep.manifest import ManifestRow, write_manifest
from data_prep.output import MANIFEST_NAME, REPORT_FOLDER, check_output_location, publish, staging_folder
from data_prep.quality import ImageCheck, check_images
from data_prep.report import write_report
from data_prep.sources import (
    Candidate,
    SourceScan,
    assign_output_names,
    extra_source_name,
    other_source_name,
    require_folder,
    scan_extra,
    scan_other,
    scan_sunrgbd,
)
from data_prep.split import split_kept_images


@dataclass
class StageTimer:
    """Wall-clock seconds per stage, for the CLI and the benchmark (never written into the dataset)."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = time.perf_counter() - start


@dataclass
class PrepResult:
    """Where the dataset went, what summary.json says, and how long each stage took."""

    out: Path
    summary: dict[str, Any]
    seconds: dict[str, float]


def check_inputs(sunrgbd: Path | None, extras: Sequence[Path], others: Sequence[Path], out: Path) -> None:
    """Every input problem we can see before reading images, each as one clear DataPrepError."""
    if sunrgbd is None and not extras:
        raise DataPrepError("nothing to read: give --sunrgbd PATH, one or more --extra DIR, or both")
    if sunrgbd is not None:
        require_folder(sunrgbd, "--sunrgbd")
    for extra in extras:
        require_folder(extra, "--extra")
    for other in others:
        require_folder(other, "--other")
    names = (([SUNRGBD_SOURCE] if sunrgbd is not None else []) + [extra_source_name(extra) for extra in extras]
             + [other_source_name(other) for other in others])
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DataPrepError(f"two sources are named {repeated[0]!r} (an extra tree's name is its folder name, "
                            "an --other tree's is other_ + its folder name)")
    check_output_location(out, [path for path in (sunrgbd, *extras, *others) if path is not None])


def scan_sources(sunrgbd: Path | None, extras: Sequence[Path], others: Sequence[Path] = ()) -> list[SourceScan]:
    """SUN RGB-D first, then the extra trees by name, then the --other trees by name: this order decides which
    copy of a duplicate stays."""
    scans = [scan_sunrgbd(sunrgbd)] if sunrgbd is not None else []
    scans += sorted((scan_extra(extra) for extra in extras), key=lambda scan: scan.source)
    return scans + sorted((scan_other(other) for other in others), key=lambda scan: scan.source)


def decide(candidates: list[Candidate], checks: list[ImageCheck | None],
           settings: Settings) -> dict[int, tuple[str, str]]:
    """(reason, detail) for every candidate to drop; the others are kept."""
    dropped: dict[int, tuple[str, str]] = {}
    for index, check in enumerate(checks):
        if check is None:
            dropped[index] = ("no_image", "the scene's image/ folder is empty or missing")
        elif check.problem is not None:
            dropped[index] = (check.problem, check.detail)
    usable = [index for index in range(len(candidates)) if index not in dropped]
    hashes = [int(checks[index].phash, 16) for index in usable]  # type: ignore[union-attr]
    groups = group_near_duplicates(hashes, settings.hash_size ** 2, settings.max_distance)
    duplicates = resolve_duplicates(groups, [candidates[index].label for index in usable],
                                    [f"{candidates[index].source}:{candidates[index].source_path}" for index in usable])
    dropped.update((usable[position], decision) for position, decision in duplicates.items())
    return dropped


def manifest_rows(candidates: list[Candidate], checks: list[ImageCheck | None], dropped: dict[int, tuple[str, str]],
                  split_of: dict[str, str]) -> list[ManifestRow]:
    """One row per candidate, in candidate order."""
    rows = []
    for index, (candidate, check) in enumerate(zip(candidates, checks, strict=True)):
        reason, detail = dropped.get(index, ("", ""))
        split = "" if reason else split_of[candidate.output_name]
        measured = check is not None and check.phash != ""
        rows.append(ManifestRow(
            source=candidate.source, source_path=candidate.source_path, label=candidate.label,
            decision="dropped" if reason else "kept", reason=reason, detail=detail,
            phash=check.phash if measured else "",
            brightness=f"{check.brightness:.4f}" if measured else "",
            contrast=f"{check.contrast:.4f}" if measured else "",
            width=str(check.width) if measured else "", height=str(check.height) if measured else "",
            split=split, output_path=f"{split}/{candidate.label}/{candidate.output_name}" if split else "",
            scene=candidate.scene))
    return rows


def inspect(candidates: list[Candidate], settings: Settings) -> list[ImageCheck | None]:
    """Decode + measure + hash every candidate that has a file (None for scenes without an image)."""
    with_files = [candidate.path for candidate in candidates if candidate.path is not None]
    results = iter(check_images(with_files, settings))
    return [next(results) if candidate.path is not None else None for candidate in candidates]


def prepare_dataset(out: Path, sunrgbd: Path | None = None, extras: Sequence[Path] = (),
                    settings: Settings | None = None, others: Sequence[Path] = ()) -> PrepResult:
    """Build the dataset at `out` from SUN RGB-D and/or extra ImageFolder trees, plus optional --other scene
    trees of photos that are none of the rooms; see data_prep/README.md."""
    settings = settings or Settings()
    out, extras = Path(os.path.abspath(out)), [Path(extra) for extra in extras]  # abspath: "." has no name
    others = [Path(other) for other in others]
    sunrgbd = Path(sunrgbd) if sunrgbd is not None else None
    timer = StageTimer()
    with timer("total"):
        check_inputs(sunrgbd, extras, others, out)
        with timer("scan"):
            scans = scan_sources(sunrgbd, extras, others)
            candidates = assign_output_names([candidate for scan in scans for candidate in scan.candidates])
        with timer("decode+hash"):
            checks = inspect(candidates, settings)
        with timer("dedup"):
            dropped = decide(candidates, checks, settings)
        with staging_folder(out) as staging:
            with timer("split+copy"):
                kept = [candidate for index, candidate in enumerate(candidates) if index not in dropped]
                split_of = split_kept_images(kept, staging, settings.seed, settings.known_other_scenes)
            with timer("manifest+report"):
                rows = manifest_rows(candidates, checks, dropped, split_of)
                write_manifest(staging / MANIFEST_NAME, rows)
                summary = write_report(staging / REPORT_FOLDER, rows, scans, settings, dataset=staging)
            publish(staging, out)
    return PrepResult(out, summary, timer.seconds)
