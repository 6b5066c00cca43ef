"""The manifest: one CSV row per candidate image, with the decision taken and why."""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

COLUMNS: tuple[str, ...] = ("source", "source_path", "class", "scene", "decision", "reason", "detail", "phash",
                            "brightness", "contrast", "width", "height", "split", "output_path")


@dataclass(frozen=True)
class ManifestRow:
    """One candidate. `output_path` is relative to the dataset folder and empty when dropped."""

    source: str
    source_path: str
    label: str
    decision: str  # "kept" or "dropped"
    reason: str  # empty when kept, else one of REASONS
    detail: str
    phash: str
    brightness: str
    contrast: str
    width: str
    height: str
    split: str
    output_path: str
    scene: str = ""  # the room for a room photo; the scene folder (dining_room, yard, ...) for an --other photo

    def to_csv(self) -> dict[str, str]:
        row = asdict(self)
        row["class"] = row.pop("label")
        return row


def write_manifest(path: Path, rows: list[ManifestRow]) -> None:
    """UTF-8 CSV with '\\n' line ends, rows in the order given (deterministic)."""
    with path.open("w", encoding="utf-8", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(row.to_csv() for row in rows)


def read_manifest(path: Path) -> list[dict[str, str]]:
    """The manifest's rows as dicts keyed by COLUMNS."""
    with path.open(encoding="utf-8", newline="") as file:
        return list(csv.DictReader(file))
