"""CLI: python -m bulk SOURCE --out RESULTS [--model TAG] [--address ADDRESS] [options].

Exit status 0 when every input has a row in RESULTS (bad images included, as error rows); 2 for bad
arguments (missing SOURCE, unknown model, RESULTS of another job); 130 when interrupted (rerun to resume).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from bulk.job import FORMATS, JobOptions, format_summary, run_job
from bulk.model import ModelNotFound
from bulk.results import JobMismatch
from bulk.sources import SourceError
from inference.errors import ModelLoadError

DEFAULTS = JobOptions(source=Path("."), out=Path("."))


def positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} must be > 0")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bulk", description="Classify every photo of SOURCE on Ray; one row per input in RESULTS. "
        "Rerun the same command after a stop to finish the job.")
    parser.add_argument("source", type=Path, metavar="SOURCE",
                        help="folder of images (recursive), text/CSV file of URLs and/or paths, or Parquet file")
    parser.add_argument("--out", type=Path, required=True, metavar="RESULTS",
                        help="result file (.parquet, or .csv); its work folder RESULTS.parts/ sits next to it")
    parser.add_argument("--model", help="model-store tag (default: RC_MODEL_TAG, i.e. room_classifier:latest)")
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else Ray on this machine)")
    parser.add_argument("--format", choices=FORMATS, help="result format (default: from RESULTS's suffix)")
    parser.add_argument("--column", help="CSV/Parquet column holding the inputs (default: input, url, image_url, "
                        "path, image, or the only column)")
    parser.add_argument("--batch-size", type=positive(int), default=DEFAULTS.batch_size,
                        help="images per decode task batch and per ONNX Runtime call")
    parser.add_argument("--actors", type=positive(int),
                        help="inference actors (default: one per CPU of the cluster)")
    parser.add_argument("--actor-cpus", type=positive(float), default=DEFAULTS.actor_cpus,
                        help="CPUs Ray reserves per inference actor")
    parser.add_argument("--load-cpus", type=positive(float), default=DEFAULTS.load_cpus,
                        help="CPUs Ray reserves per decode task")
    parser.add_argument("--load-tasks", type=positive(int),
                        help="decode tasks at a time (default: one per CPU of the cluster)")
    parser.add_argument("--ort-threads", type=positive(int), default=DEFAULTS.ort_threads,
                        help="ONNX Runtime threads per actor")
    parser.add_argument("--fetch-threads", type=positive(int), default=DEFAULTS.fetch_threads,
                        help="concurrent downloads/reads per decode task")
    parser.add_argument("--part-rows", type=positive(int), default=DEFAULTS.part_rows,
                        help="result rows per part file (a part is also written every 30 s)")
    parser.add_argument("--explain", action="store_true",
                        help="add the top class's heatmap grid (list column `heatmap`) and the crop box it covers "
                        "(`heatmap_crop_box`) to every row; needs a model with activation maps and Parquet output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = JobOptions(source=args.source, out=args.out, model=args.model, address=args.address,
                         format=args.format, column=args.column, batch_size=args.batch_size, actors=args.actors,
                         actor_cpus=args.actor_cpus, load_cpus=args.load_cpus,
                         load_tasks=args.load_tasks, ort_threads=args.ort_threads,
                         fetch_threads=args.fetch_threads, part_rows=args.part_rows, progress=not args.no_progress,
                         explain=args.explain)
    try:
        summary = run_job(options)
    except (SourceError, ModelNotFound, ModelLoadError, JobMismatch, ValueError) as exc:
        print(f"bulk: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bulk: stopped; the rows written so far are kept. Rerun the same command to finish.", file=sys.stderr)
        return 130
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
