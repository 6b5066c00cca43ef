"""Benchmark: the full data_prep job on the shared data, and deduplication at 100,000 images.

    python -m data_prep.benchmark [--data ../shared/data] [--out DIR] [--workers 2] [--dedup-count 100000]

Part 1 runs exactly what `make dataset` runs (SUNRGBD + extra/places365 + extra/house_rooms, about
11,500 images) and prints wall time per stage, total and counts. Target: under 90 s on a 2-core machine.
Part 2 times the duplicate search alone on synthetic 64-bit hashes with planted near copies, to show it
scales (no all-pairs loop). Timings are printed only; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from data_prep.__main__ import format_result
from data_prep.common import DataPrepError, Settings
from data_prep.dedup import group_near_duplicates, plan_chunks
from data_prep.pipeline import prepare_dataset

FULL_RUN_TARGET_SECONDS = 90
DEDUP_TARGET_SECONDS = 60


def default_data() -> Path:
    """../shared/data beside the repository."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def benchmark_full_run(data: Path, out: Path, workers: int) -> float:
    """Run the whole job; print its report. Returns the total wall time in seconds."""
    extras = [data / "extra" / "places365", data / "extra" / "house_rooms"]
    print(f"== full run: {data / 'SUNRGBD'} + {' + '.join(str(extra) for extra in extras)} "
          f"({workers} workers, {os.cpu_count()} CPUs)")
    result = prepare_dataset(out, sunrgbd=data / "SUNRGBD", extras=extras, settings=Settings(workers=workers))
    print(format_result(result))
    images = result.summary["candidates"]
    total = result.seconds["total"]
    print(f"throughput: {images / total:,.0f} candidates/s; target < {FULL_RUN_TARGET_SECONDS} s: "
          f"{'met' if total < FULL_RUN_TARGET_SECONDS else 'MISSED'}")
    return total


def synthetic_hashes(count: int, bits: int, max_distance: int, seed: int = 0) -> list[int]:
    """`count` random hashes of which 5 % are near copies (0..max_distance bits flipped) of others."""
    rng = random.Random(seed)
    originals = [rng.getrandbits(bits) for _ in range(count - count // 20)]
    copies = [rng.choice(originals) ^ sum(1 << bit for bit in rng.sample(range(bits), rng.randint(0, max_distance)))
              for _ in range(count // 20)]
    return originals + copies


def benchmark_dedup(count: int, settings: Settings) -> float:
    """Time `group_near_duplicates` on `count` synthetic hashes; returns seconds."""
    bits = settings.hash_size ** 2
    hashes = synthetic_hashes(count, bits, settings.max_distance)
    chunks = plan_chunks(len(set(hashes)), bits, settings.max_distance)
    print(f"== dedup: {count:,} hashes of {bits} bits, max distance {settings.max_distance}, "
          f"{len(chunks)} chunk tables searched within {chunks[0].radius} bit(s)")
    start = time.perf_counter()
    groups = group_near_duplicates(hashes, bits, settings.max_distance)
    seconds = time.perf_counter() - start
    print(f"dedup: {seconds:.1f} s, {len(groups):,} groups holding {sum(map(len, groups)):,} hashes "
          f"({count // 20:,} near copies planted); target < {DEDUP_TARGET_SECONDS} s: "
          f"{'met' if seconds < DEDUP_TARGET_SECONDS else 'MISSED'}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=default_data(),
                        help="the shared data folder (default %(default)s)")
    parser.add_argument("--out", type=Path, help="keep the dataset here (default: a temporary folder, deleted)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--dedup-count", type=int, default=100_000)
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="data_prep_benchmark_")) if args.out is None else None
    try:
        benchmark_full_run(args.data, args.out or scratch / "dataset", args.workers)
    except DataPrepError as error:
        print(f"data_prep.benchmark: error: {error}", file=sys.stderr)
        return 2
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    benchmark_dedup(args.dedup_count, Settings())
    return 0


if __name__ == "__main__":
    sys.exit(main())
