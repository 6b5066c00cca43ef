"""Where a job keeps its state, so a stopped job resumes and every input ends up exactly once in RESULTS.

The work folder `<RESULTS>.parts/` next to RESULTS holds:
- `job.json`: what the job is (SOURCE, column, model tag, format); a rerun must match it;
- `inputs.parquet`: the numbered inputs (`row`, `input`), listed once on the first run;
- `part-<first row>-<hash>.parquet`: result rows, written by the driver only, each one atomically (a temporary
  name, then a rename), so a killed job leaves whole parts or none;
- `summary.json`: the last run's summary.

A run classifies the rows no part holds yet. `consolidate` then writes RESULTS from the parts, keeping the
first row seen for each input (a part written twice cannot duplicate a row), again through a temporary name.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

PART_GLOB = "part-*.parquet"
TEMP_SUFFIX = ".tmp"


class JobMismatch(ValueError):
    """RESULTS already belongs to a job with other arguments (another SOURCE, model or format)."""


@dataclass(frozen=True)
class JobSpec:
    """What makes two runs the same job: a rerun with another SOURCE or model must not mix into the parts."""

    source: str
    column: str | None
    model: str
    format: str
    explain: bool = False  # the heatmap columns: a rerun with or without --explain is another job


class WorkDir:
    def __init__(self, results: Path) -> None:
        self.results = results
        self.path = results.with_name(results.name + ".parts")
        self.inputs = self.path / "inputs.parquet"
        self.spec_file = self.path / "job.json"
        self.summary_file = self.path / "summary.json"

    def start(self, spec: JobSpec) -> bool:
        """Record `spec` on the first run, or check a rerun against it; True when resuming."""
        self.path.mkdir(parents=True, exist_ok=True)
        for leftover in self.path.glob(f"*{TEMP_SUFFIX}"):  # a write cut short by a kill
            leftover.unlink()
        if self.spec_file.exists() and self.inputs.exists():
            recorded = JobSpec(**json.loads(self.spec_file.read_text()))
            if recorded != spec:
                raise JobMismatch(f"{self.results} belongs to another job ({describe_difference(recorded, spec)}); "
                                  f"rerun with the same arguments to resume, or choose another --out")
            return True
        write_atomically(self.spec_file, json.dumps(asdict(spec), indent=2).encode())
        return False

    def parts(self) -> list[Path]:
        return sorted(self.path.glob(PART_GLOB))

    def done_rows(self, total: int) -> np.ndarray:
        """A flag per input: True when some part already holds its result (8 bytes per part row read)."""
        done = np.zeros(total, dtype=bool)
        for part in self.parts():
            done[pq.read_table(part, columns=["row"]).column("row").to_numpy()] = True
        return done

    def pending_inputs(self, done: np.ndarray, rows_per_block: int) -> Iterator[pa.Table]:
        """The inputs without a result, in blocks of at most `rows_per_block` rows."""
        for batch in pq.ParquetFile(self.inputs).iter_batches(batch_size=rows_per_block):
            rows = batch.column("row").to_numpy()
            keep = ~done[rows]
            if keep.any():
                yield pa.Table.from_batches([batch]).filter(pa.array(keep))

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_atomically(self.summary_file, json.dumps(summary, indent=2).encode())


def describe_difference(recorded: JobSpec, wanted: JobSpec) -> str:
    old, new = asdict(recorded), asdict(wanted)
    return ", ".join(f"{key} was {old[key]!r}, now {new[key]!r}" for key in old if old[key] != new[key])


def write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + TEMP_SUFFIX)
    partial.write_bytes(data)
    os.replace(partial, path)


class PartWriter:
    """Collects result rows on the driver and writes a part every `part_rows` rows or `flush_s` seconds.

    The time bound caps what a kill can cost (the rows of one unwritten part); the row bound keeps the
    number of files reasonable for millions of inputs.
    """

    def __init__(self, folder: Path, schema: pa.Schema, part_rows: int, flush_s: float = 30.0) -> None:
        self.folder, self.schema, self.part_rows, self.flush_s = folder, schema, part_rows, flush_s
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.last_flush = time.monotonic()

    def add(self, table: pa.Table) -> None:
        self.pending.append(table.select(self.schema.names).cast(self.schema))
        self.pending_rows += table.num_rows
        if self.pending_rows >= self.part_rows or time.monotonic() - self.last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.pending_rows:
            return
        table = pa.concat_tables(self.pending)
        self.pending, self.pending_rows = [], 0
        rows = table.column("row").to_numpy()
        digest = hashlib.sha1(np.sort(rows).tobytes()).hexdigest()[:12]
        target = self.folder / f"part-{rows.min():012d}-{digest}.parquet"
        partial = target.with_name(target.name + TEMP_SUFFIX)
        pq.write_table(table, partial)
        os.replace(partial, target)


def consolidate(work: WorkDir, total: int, schema: pa.Schema, fmt: str) -> Counter:
    """Write RESULTS from the parts, one row per input (the first seen); return the count per error code.

    Streams part by part: memory holds one part and a flag per input, whatever the catalogue's size.
    Raises RuntimeError if any input has no row (the caller reruns the job).
    """
    seen = np.zeros(total, dtype=bool)
    outcomes: Counter = Counter()
    partial = work.results.with_name(work.results.name + TEMP_SUFFIX)
    writer = pq.ParquetWriter(partial, schema) if fmt == "parquet" else pacsv.CSVWriter(partial, schema)
    try:
        for part in work.parts():
            table = pq.read_table(part).select(schema.names).cast(schema)
            rows = table.column("row").to_numpy()
            first = first_occurrences(rows) & ~seen[rows]
            table = table.filter(pa.array(first)).sort_by("row")
            seen[table.column("row").to_numpy()] = True
            outcomes.update("ok" if code is None else code for code in table.column("error_code").to_pylist())
            writer.write_table(table)
    finally:
        writer.close()
    missing = int((~seen).sum())
    if missing:
        partial.unlink()
        raise RuntimeError(f"{missing} of {total} inputs have no result yet; rerun the same command to finish")
    os.replace(partial, work.results)
    return outcomes


def first_occurrences(rows: np.ndarray) -> np.ndarray:
    """True at the first position of every distinct value."""
    flags = np.zeros(len(rows), dtype=bool)
    flags[np.unique(rows, return_index=True)[1]] = True
    return flags
