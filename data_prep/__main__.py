"""CLI: python -m data_prep --sunrgbd PATH [--extra DIR ...] --out DIR [options].

Bad input gives one line on stderr and exit status 2; timings go to stdout, never into the dataset.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from data_prep.common import CLASSES, OTHER, REASONS, SPLITS, DataPrepError, Settings
from data_prep.pipeline import PrepResult, prepare_dataset

DEFAULTS = Settings()


def _bounded(kind: Callable[[str], float | int], low: float, high: float) -> Callable[[str], float | int]:
    """An argparse type: `kind(text)` within [low, high], else a clear usage error."""
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is outside [{low}, {high}]")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="SUN RGB-D (+ extra ImageFolder trees) -> clean, deterministic 70/20/10 dataset of "
                    f"{', '.join(CLASSES)} (and {OTHER}: none of them, from --other trees), with manifest.csv and "
                    "an EDA report.")
    parser.add_argument("--sunrgbd", type=Path, help="SUN RGB-D root: scene folders found at any depth by scene.txt")
    parser.add_argument("--extra", type=Path, action="append", default=[], metavar="DIR",
                        help="an ImageFolder tree <class>/*.jpg; its folder name is the source name (repeatable)")
    parser.add_argument("--other", type=Path, action="append", default=[], metavar="DIR",
                        help=f"a scene tree <scene>/*.jpg of photos that are none of the rooms, labelled {OTHER!r}; "
                             "its source name is other_ + its folder name (repeatable)")
    parser.add_argument("--out", type=Path, required=True,
                        help="dataset folder to create (replaced only when complete)")
    parser.add_argument("--dark-threshold", type=_bounded(float, 0, 1), default=DEFAULTS.dark_threshold, metavar="F",
                        help="drop images whose mean grey level (0 black .. 1 white) is below F (default %(default)s)")
    parser.add_argument("--blank-threshold", type=_bounded(float, 0, 1), default=DEFAULTS.blank_threshold, metavar="F",
                        help="drop images whose grey-level standard deviation is below F (default %(default)s)")
    parser.add_argument("--hash-size", type=_bounded(int, 2, 32), default=DEFAULTS.hash_size, metavar="N",
                        help="perceptual hash of N*N bits (default %(default)s)")
    parser.add_argument("--max-distance", type=_bounded(int, 0, 1023), default=DEFAULTS.max_distance, metavar="N",
                        help="hashes at most N bits apart are the same photo (default %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="split-folders seed (default %(default)s)")
    parser.add_argument("--workers", type=_bounded(int, 1, 256), default=min(2, os.cpu_count() or 1), metavar="N",
                        help="processes that decode and hash images (default %(default)s)")
    return parser


def parse_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Settings:
    if args.sunrgbd is None and not args.extra:
        parser.error("give --sunrgbd PATH, one or more --extra DIR, or both")
    if args.max_distance >= args.hash_size ** 2:
        parser.error(f"--max-distance {args.max_distance} must be below the hash's {args.hash_size ** 2} bits")
    return Settings(dark_threshold=args.dark_threshold, blank_threshold=args.blank_threshold,
                    hash_size=args.hash_size, max_distance=args.max_distance, seed=args.seed, workers=args.workers)


def format_result(result: PrepResult) -> str:
    """The run's timings and counts, for stdout."""
    summary = result.summary
    lines = [f"data_prep: {summary['candidates']:,} candidates from {', '.join(summary['sources'])} -> {result.out}"]
    lines += [f"  {stage:<16}{seconds:8.1f} s" for stage, seconds in result.seconds.items() if stage != "total"]
    lines.append(f"  {'total':<16}{result.seconds['total']:8.1f} s")
    splits = " / ".join(f"{split} {sum(summary['splits'][split].values()):,}" for split in SPLITS)
    drops = ", ".join(f"{reason} {summary['dropped_by_reason'][reason]:,}" for reason in REASONS
                      if summary["dropped_by_reason"][reason])
    dropped = f"dropped {summary['dropped']:,}" + (f": {drops}" if drops else "")
    lines.append(f"kept {summary['kept']:,} ({splits}); {dropped}")
    lines.append(f"report: {result.out / 'report' / 'report.md'}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = parse_settings(parser, args)
    try:
        result = prepare_dataset(args.out, sunrgbd=args.sunrgbd, extras=args.extra, settings=settings,
                                 others=args.other)
    except DataPrepError as error:
        print(f"data_prep: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # disk full, permissions changed mid-run, ...: the environment, not a bug
        print(f"data_prep: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("data_prep: interrupted; no dataset was written", file=sys.stderr)
        return 130
    print(format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
