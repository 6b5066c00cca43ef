"""Service configuration: every `RC_*` setting declared once, typed, with its bounds and what it means.

`ServiceConfig` is that declaration (pydantic-settings): the kernel's settings (`inference.config.KernelConfig`:
model tag, decoder limits, URL policy, threshold) and the server's own (workers, threads,
batching, concurrency, timeouts, API keys). The variable for a field is `RC_` + the field name in upper case
(`max_batch_size` -> `RC_MAX_BATCH_SIZE`). `ServiceConfig.from_env()` reads them (the service);
`ServiceConfig()` is the declared defaults whatever the environment says (tests, benchmarks). A bad value stops
the service at start-up with a ValueError naming the variable.

The table of variables is generated from the declaration: `python -m serving.config` prints it, and
README.md ("Serving", between the `rc-settings` markers) holds a copy that tests/test_inference_config.py
keeps equal. To add a setting: add a field here (or to `KernelConfig` when bulk jobs read it too), run
`python -m serving.config`, paste the table.
"""

from __future__ import annotations

import math
import os
import sys
import typing
from pathlib import Path
from typing import Optional, Union

from pydantic import Field
from pydantic.fields import FieldInfo

from inference.config import MIB, KernelConfig, variable_name

CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The cores this process may run on: its CPU affinity, capped by a container's CPU limit (a container
    limited to 2 CPUs on a 64-core host must not start 64 threads)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT) -> float | None:
    """The CPU limit in cores of this process's cgroup: cgroup v2's `cpu.max`, else cgroup v1's CFS quota
    (nodes and hosts that still mount the v1 `cpu` controller); None when there is no limit or no cgroup."""
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def half_the_cores() -> int:
    return max(1, available_cores() // 2)


def shown_as(text: str) -> dict[str, str]:
    """How the table shows a default computed at start-up (`default_factory`)."""
    return {"default_shown": text}


class ServiceConfig(KernelConfig):
    """All service settings: the kernel's (`KernelConfig`, listed first) and the server's own. Frozen: read once
    at start-up, then shared by every request."""

    workers: int = Field(1, ge=1, description="worker processes, each with its own model session and batcher")
    ort_threads: int = Field(
        default_factory=half_the_cores, ge=1, json_schema_extra=shown_as("half the cores"),
        description="ONNX Runtime intra-op threads per worker (1 on a 2-core machine)")
    decode_threads: int = Field(
        default_factory=available_cores, ge=1, json_schema_extra=shown_as("the cores"),
        description="images decoded + preprocessed at the same time per worker")
    max_batch_size: int = Field(16, ge=1, description="adaptive batching: most images per ONNX Runtime call; "
                                                       "1 turns batching off")
    max_latency_ms: int = Field(1000, ge=1, description="adaptive batching: longest an image may wait for the "
                                                         "model before 503 `model_overloaded`")
    max_concurrency: int = Field(32, ge=1, description="classify requests in flight per worker; more wait in "
                                                        "line (below)")
    max_queued: int = Field(64, ge=0, description="classify requests that may wait for a slot per worker; more "
                                                   "get 429 + Retry-After at once")
    queue_timeout_s: float = Field(5.0, gt=0, description="longest wait in that line; then 429 + Retry-After")
    request_timeout_s: float = Field(30.0, gt=0, description="longest request; after it 504 `timeout` "
                                                              "(BentoML's own timeout is 5 s later, a backstop)")
    retry_after_s: int = Field(1, ge=0, description="Retry-After header value on 429/503")
    default_top_k: int = Field(3, ge=1, description="length of `top_k` when the request does not say")
    max_images_per_request: int = Field(16, ge=1, description="images in one classify_batch request")
    max_request_bytes: int = Field(32 * MIB, ge=1, description="whole request body (32 MiB); larger bodies get "
                                                                "413 before they are read")
    api_keys_file: Optional[Path] = Field(None, description="API key hashes and quotas (JSON); set: /classify and "
                                                            "/classify_batch need a key; unset: open to all")
    request_tracing: bool = Field(False, description="BentoML's OpenTelemetry middleware on /classify and "
                                                     "/classify_batch (off: they skip it, 0.3-0.6 ms CPU per request "
                                                     "even with nothing sampled); on: also set BentoML's `tracing`")


# ----------------------------------------------------------------------------------------------------
# The documentation, generated from the declaration above


def settings_table() -> str:
    """The markdown table of every RC_* variable: name, default, allowed values, meaning."""
    lines = ["| variable | default | allowed | meaning |", "|---|---|---|---|"]
    for name, field in ServiceConfig.model_fields.items():
        lines.append(f"| {variable_name(name)} | {shown_default(field)} | {allowed_values(field)} | "
                     f"{field.description} |")
    return "\n".join(lines) + "\n"


def shown_default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return str((field.json_schema_extra or {})["default_shown"])  # type: ignore[index]
    value = field.default
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(value) if value else "(empty)"
    return number_text(value) if isinstance(value, (int, float)) else str(value)


TYPE_NAMES = {str: "text", int: "integer", float: "number", bool: "true/false", tuple: "comma-separated list",
              Path: "file path"}
BOUND_SIGNS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def allowed_values(field: FieldInfo) -> str:
    """`integer >= 1`, `number >= 0, <= 1`, `non-empty text`, ... from the field's type and bounds."""
    annotation = field.annotation
    if typing.get_origin(annotation) is Union:  # Optional[X]: unset is allowed, the kind is X's
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    kind = TYPE_NAMES[typing.get_origin(annotation) or annotation]
    bounds = [f"{sign} {number_text(getattr(item, name))}" for item in field.metadata
              for name, sign in BOUND_SIGNS if getattr(item, name, None) is not None]
    if any(getattr(item, "min_length", None) == 1 for item in field.metadata):
        kind = "non-empty " + kind
    return f"{kind} {', '.join(bounds)}".strip()


def number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


if __name__ == "__main__":
    sys.stdout.write(settings_table())
