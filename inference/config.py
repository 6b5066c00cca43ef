"""Service configuration: every `RC_*` setting declared once, typed, with its bounds and what it means.

`ServiceConfig` is that declaration (pydantic-settings). The variable for a field is `RC_` + the field name in
upper case (`max_batch_size` -> `RC_MAX_BATCH_SIZE`). `ServiceConfig.from_env()` reads them (the service,
bulk jobs); `ServiceConfig()` is the declared defaults whatever the environment says (tests, training's
evaluation, benchmarks). A bad value stops the service at start-up with a ValueError naming the variable.

The table of variables is generated from the declaration: `python -m inference.config` prints it, and
README.md ("Serving", between the `rc-settings` markers) holds a copy that tests/test_inference_config.py
keeps equal. To add a setting: add a field here, run `python -m inference.config`, paste the table.
"""

from __future__ import annotations

import math
import os
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Iterable, Mapping, Optional, Union

from PIL import Image
from pydantic import Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from inference.decode import ImageLimits
from inference.fetch import UrlPolicy

ENV_PREFIX = "RC_"
MIB = 1024 * 1024
# pydantic-settings would read a list as JSON; RC_* lists are comma-separated (`split_commas` below)
CommaList = Annotated[tuple[str, ...], NoDecode]


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


class ServiceConfig(BaseSettings):
    """All service settings. Frozen: read once at start-up, then shared by every request."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    model_tag: str = Field("room_classifier:latest", min_length=1, description="model-store tag to serve")
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
    uncertain_threshold: float = Field(0.5, ge=0.0, le=1.0, description="`uncertain` when the top probability is "
                                                                         "below this (a request's `threshold` wins)")
    default_top_k: int = Field(3, ge=1, description="length of `top_k` when the request does not say")
    max_images_per_request: int = Field(16, ge=1, description="images in one classify_batch request")
    max_request_bytes: int = Field(32 * MIB, ge=1, description="whole request body (32 MiB); larger bodies get "
                                                                "413 before they are read")
    max_image_bytes: int = Field(10 * MIB, ge=1, description="one image, uploaded or downloaded (10 MiB)")
    max_pixels: int = Field(40_000_000, ge=1, description="width x height, checked from the image header "
                                                           "before decoding")
    image_formats: CommaList = Field(("JPEG", "PNG", "WEBP", "GIF"), min_length=1,
                                     description="accepted formats (Pillow names, checked at start-up), "
                                                 "detected from content")
    jpeg_draft: bool = Field(True, description="decode large JPEGs at 1/2-1/8 scale, never below the model's "
                                               "resize size (~4x faster)")
    url_fetch: bool = Field(True, description="accept `image_url(s)` at all (false: uploads only)")
    url_allowlist: CommaList = Field((), description="hosts and CIDRs that may be private/loopback, e.g. "
                                                     "`images.internal,10.0.0.0/8`")
    fetch_connect_timeout_s: float = Field(3.0, gt=0, description="connect timeout per hop")
    fetch_read_timeout_s: float = Field(5.0, gt=0, description="longest wait for the next bytes")
    fetch_total_timeout_s: float = Field(10.0, gt=0, description="whole download, redirects included")
    fetch_max_redirects: int = Field(3, ge=0, description="redirects followed, each hop vetted again")
    api_keys_file: Optional[Path] = Field(None, description="API key hashes and quotas (JSON); set: /classify and "
                                                            "/classify_batch need a key; unset: open to all")

    @field_validator("image_formats", "url_allowlist", mode="before")
    @classmethod
    def split_commas(cls, value: Any) -> Any:
        """`JPEG, PNG,` -> ("JPEG", "PNG"): blanks around and between the commas are dropped."""
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @field_validator("image_formats")
    @classmethod
    def pillow_knows(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        """A typo like JPG would make every image a 422 corrupt_image: refuse it at start-up."""
        unknown = unknown_image_formats(value)
        if unknown:
            raise ValueError(f"Pillow knows no format {', '.join(map(repr, unknown))}; "
                             "use Pillow's names, e.g. JPEG,PNG,WEBP,GIF")
        return value

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only the arguments: the environment is read by `from_env`, explicitly, so `ServiceConfig()` is the
        declared defaults in tests, training and benchmarks whatever RC_* variables are set around them."""
        return (init_settings,)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "ServiceConfig":
        """Read `RC_*` variables from `environ` (default: os.environ); unset or blank ones keep their default.
        Raises ValueError naming each bad variable and its value."""
        environ = os.environ if environ is None else environ
        try:
            return cls(**EnvironSource(cls, environ)())
        except ValidationError as exc:
            raise ValueError("; ".join(describe_error(error, environ) for error in exc.errors())) from None

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


class EnvironSource(EnvSettingsSource):
    """pydantic-settings' environment source reading `environ` (os.environ or a test's dict) instead of always
    os.environ. Values are stripped; blank ones count as unset."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self.environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {key if self.case_sensitive else key.lower(): value.strip()
                for key, value in self.environ.items() if value.strip()}


def variable_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def describe_error(error: Mapping[str, Any], environ: Mapping[str, str]) -> str:
    """One pydantic error -> `RC_WORKERS='0': Input should be greater than or equal to 1`."""
    if not error["loc"]:
        return str(error["msg"])
    name = variable_name(str(error["loc"][0]))
    raw = next((value for key, value in environ.items() if key.upper() == name), None)
    return f"{name}={raw!r}: {error['msg']}" if raw is not None else f"{name}: {error['msg']}"


def unknown_image_formats(names: Iterable[str]) -> list[str]:
    """The names (case-insensitive) that are not image formats Pillow can open."""
    Image.init()  # registers every plugin, so Image.OPEN lists all of them
    return [name for name in names if name.upper() not in Image.OPEN]


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
