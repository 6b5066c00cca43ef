"""Shared parts of the load commands that only measure: photo sizes, latency percentiles, the loopback rule.

Servers, model homes, image hosts and photos come from `testkit`, which the tests use too.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence

import numpy as np


def parse_size(text: str) -> tuple[int, int]:
    """'640x480' -> (640, 480)."""
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not match:
        raise ValueError(f"size must look like 640x480, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def percentiles_ms(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 (and mean, max) of latencies in milliseconds; NaN when there are none."""
    if not latencies_s:
        return {key: float("nan") for key in ("p50", "p95", "p99", "mean", "max")}
    values = np.asarray(latencies_s) * 1000.0
    return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95)),
            "p99": float(np.percentile(values, 99)), "mean": float(values.mean()), "max": float(values.max())}


def require_loopback_url(parser: argparse.ArgumentParser, url: str | None) -> None:
    """These commands only drive servers on this machine: refuse any other --url."""
    if url and not url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        parser.error("--url must be a loopback address: this command only drives local servers")
