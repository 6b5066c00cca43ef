"""Service configuration: every knob in one dataclass, read once from `RC_*` environment variables.

The variable for a field is `RC_` + the field name in upper case (`max_batch_size` -> `RC_MAX_BATCH_SIZE`).
Thread counts default to the cores this process may use (`available_cores`: CPU affinity and a container's
CPU quota), so ONNX Runtime and the decoders share them instead of fighting. Lists are comma-separated.
A bad value stops the service at start-up with a message naming the variable.

| variable | default | meaning |
|---|---|---|
| RC_MODEL_TAG | room_classifier:latest | model-store tag to serve |
| RC_WORKERS | 1 | worker processes, each with its own model session and batcher |
| RC_ORT_THREADS | half the cores | ONNX Runtime intra-op threads per worker (1 on a 2-core machine) |
| RC_DECODE_THREADS | the cores | images decoded + preprocessed at the same time per worker |
| RC_MAX_BATCH_SIZE | 16 | adaptive batching: most images per ONNX Runtime call; 1 turns batching off |
| RC_MAX_LATENCY_MS | 1000 | adaptive batching: longest an image may wait for the model before 503 `model_overloaded` |
| RC_MAX_CONCURRENCY | 32 | classify requests in flight per worker; more wait in line (below) |
| RC_MAX_QUEUED | 64 | classify requests that may wait for a slot per worker; more get 429 + Retry-After at once |
| RC_QUEUE_TIMEOUT_S | 5 | longest wait in that line; then 429 + Retry-After |
| RC_REQUEST_TIMEOUT_S | 30 | longest request; after it 504 `timeout` (BentoML's own timeout is 5 s later, a backstop) |
| RC_RETRY_AFTER_S | 1 | Retry-After header value on 429/503 |
| RC_UNCERTAIN_THRESHOLD | 0.5 | `uncertain` when the top probability is below this (a request's `threshold` wins) |
| RC_DEFAULT_TOP_K | 3 | length of `top_k` when the request does not say |
| RC_MAX_IMAGES_PER_REQUEST | 16 | images in one classify_batch request |
| RC_MAX_REQUEST_BYTES | 33554432 | whole request body (32 MiB); larger bodies get 413 before they are read |
| RC_MAX_IMAGE_BYTES | 10485760 | one image, uploaded or downloaded (10 MiB) |
| RC_MAX_PIXELS | 40000000 | width x height, checked from the image header before decoding |
| RC_IMAGE_FORMATS | JPEG,PNG,WEBP,GIF | accepted formats (Pillow names, checked at start-up), detected from content |
| RC_JPEG_DRAFT | true | decode large JPEGs at 1/2-1/8 scale, never below the model's resize size (~4x faster) |
| RC_URL_FETCH | true | accept `image_url(s)` at all (false: uploads only) |
| RC_URL_ALLOWLIST | (empty) | hosts and CIDRs that may be private/loopback, e.g. `images.internal,10.0.0.0/8` |
| RC_FETCH_CONNECT_TIMEOUT_S | 3 | connect timeout per hop |
| RC_FETCH_READ_TIMEOUT_S | 5 | longest wait for the next bytes |
| RC_FETCH_TOTAL_TIMEOUT_S | 10 | whole download, redirects included |
| RC_FETCH_MAX_REDIRECTS | 3 | redirects followed, each hop vetted again |
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

from PIL import Image

from inference.decode import ImageLimits
from inference.fetch import UrlPolicy

ENV_PREFIX = "RC_"


@dataclass(frozen=True)
class ServiceConfig:
    """All service settings; see the module docstring for the table of variables."""

    model_tag: str = "room_classifier:latest"
    workers: int = 1
    ort_threads: int = field(default_factory=lambda: max(1, available_cores() // 2))
    decode_threads: int = field(default_factory=lambda: available_cores())
    max_batch_size: int = 16
    max_latency_ms: int = 1000
    max_concurrency: int = 32
    max_queued: int = 64
    queue_timeout_s: float = 5.0
    request_timeout_s: float = 30.0
    retry_after_s: int = 1
    uncertain_threshold: float = 0.5
    default_top_k: int = 3
    max_images_per_request: int = 16
    max_request_bytes: int = 32 * 1024 * 1024
    max_image_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    image_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF")
    jpeg_draft: bool = True
    url_fetch: bool = True
    url_allowlist: tuple[str, ...] = ()
    fetch_connect_timeout_s: float = 3.0
    fetch_read_timeout_s: float = 5.0
    fetch_total_timeout_s: float = 10.0
    fetch_max_redirects: int = 3

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "ServiceConfig":
        """Read `RC_*` variables (unset ones keep their default); raise ValueError naming a bad one."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for item in fields(cls):
            name = ENV_PREFIX + item.name.upper()
            raw = environ.get(name)
            if raw is None or raw.strip() == "":
                continue
            try:
                values[item.name] = _parse(raw.strip(), str(item.type))
            except ValueError as exc:
                raise ValueError(f"{name}={raw!r}: {exc}") from None
        config = cls(**values)
        config.validate()
        return config

    def image_limits(self) -> ImageLimits:
        """The decoder's limits (`inference.decode.decode_image`) from these settings."""
        return ImageLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_pixels,
                           formats=tuple(name.upper() for name in self.image_formats))

    def url_policy(self) -> UrlPolicy:
        """The URL fetcher's policy (`inference.fetch.fetch_url`) from these settings."""
        return UrlPolicy.with_allowlist(
            self.url_allowlist, connect_timeout_s=self.fetch_connect_timeout_s,
            read_timeout_s=self.fetch_read_timeout_s, total_timeout_s=self.fetch_total_timeout_s,
            max_redirects=self.fetch_max_redirects, max_bytes=self.max_image_bytes)

    def validate(self) -> None:
        """Refuse settings that cannot work (zero threads, negative limits, thresholds outside [0, 1])."""
        positive = ("workers", "ort_threads", "decode_threads", "max_batch_size", "max_latency_ms",
                    "max_concurrency", "queue_timeout_s", "request_timeout_s", "default_top_k",
                    "max_images_per_request", "max_request_bytes", "max_image_bytes", "max_pixels",
                    "fetch_connect_timeout_s", "fetch_read_timeout_s", "fetch_total_timeout_s")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{ENV_PREFIX}{name.upper()} must be > 0, got {getattr(self, name)}")
        if self.retry_after_s < 0 or self.fetch_max_redirects < 0 or self.max_queued < 0:
            raise ValueError("RC_RETRY_AFTER_S, RC_FETCH_MAX_REDIRECTS and RC_MAX_QUEUED must be >= 0")
        if not 0.0 <= self.uncertain_threshold <= 1.0:
            raise ValueError(f"RC_UNCERTAIN_THRESHOLD must be in [0, 1], got {self.uncertain_threshold}")
        if not self.image_formats:
            raise ValueError("RC_IMAGE_FORMATS must name at least one format")
        unknown = unknown_image_formats(self.image_formats)
        if unknown:  # a typo like JPG would make every image a 422 corrupt_image
            raise ValueError(f"RC_IMAGE_FORMATS: Pillow knows no format {', '.join(map(repr, unknown))}; "
                             "use Pillow's names, e.g. JPEG,PNG,WEBP,GIF")


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (a container
    limited to 2 CPUs on a 64-core host must not start 64 threads)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota here
    return max(1, cores)


def unknown_image_formats(names: Iterable[str]) -> list[str]:
    """The names (case-insensitive) that are not image formats Pillow can open."""
    Image.init()  # registers every plugin, so Image.OPEN lists all of them
    return [name for name in names if name.upper() not in Image.OPEN]


def _parse(raw: str, type_name: str) -> Any:
    """Convert an environment string to the field's type (the dataclass annotations are strings)."""
    if type_name == "str":
        return raw
    if type_name == "int":
        return int(raw.replace("_", ""))
    if type_name == "float":
        return float(raw)
    if type_name == "bool":
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true/false")
    if type_name == "tuple[str, ...]":
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    raise ValueError(f"unsupported setting type {type_name}")
