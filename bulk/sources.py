"""SOURCE -> the job's list of inputs, numbered once and kept in the work folder as `inputs.parquet`.

A SOURCE is one of:
- a folder: every file below it, recursively, in sorted order (a non-image file gets an error row, it is not
  skipped silently);
- a text file (any suffix but .csv/.parquet): one URL or path per line; blank lines and `#` comments skipped;
- a CSV or Parquet file: the column named by `column`, else the first of INPUT_COLUMNS it has, else its only column.

Inputs are kept as given; relative paths are read relative to the list file's folder (`base_dir`). The list is
streamed into Parquet in chunks, so a catalogue of millions of inputs never sits in memory as Python strings.
`row` (the position in SOURCE) identifies an input: a URL listed twice is two inputs with two result rows.
"""

from __future__ import annotations

import csv
import os
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

INPUT_COLUMNS = ("input", "url", "image_url", "path", "image")
CHUNK_ROWS = 65_536
INPUT_SCHEMA = pa.schema([("row", pa.int64()), ("input", pa.string())])


class SourceError(ValueError):
    """SOURCE cannot be listed (missing, empty, no usable column); the message says what to fix."""


def base_dir(source: Path) -> Path:
    """Where relative paths of a list file point: the list's own folder."""
    source = source.resolve()
    return source if source.is_dir() else source.parent


def write_input_list(source: Path, target: Path, column: str | None = None) -> int:
    """Number every input of `source` and write (row, input) to `target` (atomically); return the count."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".tmp")
    count = 0
    with pq.ParquetWriter(partial, INPUT_SCHEMA) as writer:
        inputs = iter_inputs(source, column)
        while chunk := list(islice(inputs, CHUNK_ROWS)):
            writer.write_table(pa.table({"row": pa.array(range(count, count + len(chunk)), pa.int64()),
                                         "input": pa.array(chunk, pa.string())}, schema=INPUT_SCHEMA))
            count += len(chunk)
    if count == 0:
        partial.unlink()
        raise SourceError(f"{source} holds no inputs")
    os.replace(partial, target)
    return count


def iter_inputs(source: Path, column: str | None = None) -> Iterator[str]:
    if source.is_dir():
        return iter_folder(source)
    if not source.is_file():
        raise SourceError(f"{source} is neither a folder nor a file")
    suffix = source.suffix.lower()
    if suffix == ".parquet":
        return iter_parquet_column(source, column)
    if suffix == ".csv":
        return iter_csv_column(source, column)
    return iter_lines(source)


def iter_folder(folder: Path) -> Iterator[str]:
    """Every file under `folder` (absolute paths), directories and files in sorted order."""
    for root, dirs, files in os.walk(folder.resolve()):
        dirs.sort()
        for name in sorted(files):
            yield os.path.join(root, name)


def iter_lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            text = line.strip()
            if text and not text.startswith("#"):
                yield text


def iter_csv_column(path: Path, column: str | None) -> Iterator[str]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        name = pick_column(reader.fieldnames or [], column, path)
        for record in reader:
            text = (record.get(name) or "").strip()
            if text:
                yield text


def iter_parquet_column(path: Path, column: str | None) -> Iterator[str]:
    parquet = pq.ParquetFile(path)
    name = pick_column(parquet.schema_arrow.names, column, path)
    for batch in parquet.iter_batches(columns=[name], batch_size=CHUNK_ROWS):
        for value in batch.column(0).to_pylist():
            if value is not None and str(value).strip():
                yield str(value).strip()


def pick_column(names: Iterable[str], wanted: str | None, path: Path) -> str:
    names = list(names)
    if wanted is not None:
        if wanted not in names:
            raise SourceError(f"{path} has no column {wanted!r} (columns: {names})")
        return wanted
    for candidate in INPUT_COLUMNS:
        if candidate in names:
            return candidate
    if len(names) == 1:
        return names[0]
    raise SourceError(f"{path}: say which column holds the inputs with --column (columns: {names})")
