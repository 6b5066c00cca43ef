"""The kernel's settings: which model, what input it accepts, when an answer is uncertain.

`KernelConfig` declares the `RC_*` settings that everything running the model shares (the service, bulk jobs,
training's evaluation): decoder limits, the URL fetch policy, the model tag and the uncertainty threshold. None
of them changes the pixels a model sees: that is the model's own preprocessing (`inference.preprocess.
Preprocessing`, stored with it), so what was measured is what is served. The server's own settings (workers,
batching, concurrency, timeouts, API keys) extend it in `serving.config.ServiceConfig`, so training and bulk
never import the server.

The variable for a field is `RC_` + the field name in upper case (`max_pixels` -> `RC_MAX_PIXELS`).
`KernelConfig.from_env()` reads them; `KernelConfig()` is the declared defaults whatever the environment says.
A bad value raises a ValueError naming the variable, and so does a retired one (`RETIRED_VARIABLES`).
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Iterable, Mapping, TypeVar

from PIL import Image
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from inference.decode import ImageLimits
from inference.fetch import UrlPolicy

ENV_PREFIX = "RC_"
MIB = 1024 * 1024
# pydantic-settings would read a list as JSON; RC_* lists are comma-separated (`split_commas` below)
CommaList = Annotated[tuple[str, ...], NoDecode]
Settings = TypeVar("Settings", bound="KernelConfig")
# Variables that were settings once. Undeclared RC_* variables are ignored (a bulk job ignores RC_WORKERS), so
# a deployment still setting one of these would silently not get what it asks for: `from_env` refuses them.
RETIRED_VARIABLES = {
    "RC_JPEG_DRAFT": "reduced-scale JPEG decoding changes the pixels the model sees, so it is now part of the "
                     "model's preprocessing (`preprocessing.jpeg_draft` in its metadata, chosen at training and "
                     "evaluated with the model); unset RC_JPEG_DRAFT",
}


class KernelConfig(BaseSettings):
    """The settings of the model kernel. Frozen: read once at start-up, then shared by every image."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    model_tag: str = Field("room_classifier:latest", min_length=1, description="model-store tag to serve")
    uncertain_threshold: float = Field(0.5, ge=0.0, le=1.0, description="`uncertain` when the top probability is "
                                                                         "below this (a request's `threshold` wins)")
    max_image_bytes: int = Field(10 * MIB, ge=1, description="one image, uploaded or downloaded (10 MiB)")
    max_pixels: int = Field(40_000_000, ge=1, description="width x height, checked from the image header "
                                                           "before decoding")
    image_formats: CommaList = Field(("JPEG", "PNG", "WEBP", "GIF"), min_length=1,
                                     description="accepted formats (Pillow names, checked at start-up), "
                                                 "detected from content")
    url_fetch: bool = Field(True, description="accept `image_url(s)` at all (false: uploads only)")
    url_allowlist: CommaList = Field((), description="hosts and CIDRs that may be private/loopback, e.g. "
                                                     "`images.internal,10.0.0.0/8`")
    fetch_connect_timeout_s: float = Field(3.0, gt=0, description="connect timeout per hop")
    fetch_read_timeout_s: float = Field(5.0, gt=0, description="longest wait for the next bytes")
    fetch_total_timeout_s: float = Field(10.0, gt=0, description="whole download, redirects included")
    fetch_max_redirects: int = Field(3, ge=0, description="redirects followed, each hop vetted again")

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
        """Only the arguments: the environment is read by `from_env`, explicitly, so `KernelConfig()` is the
        declared defaults in tests, training and benchmarks whatever RC_* variables are set around them."""
        return (init_settings,)

    @classmethod
    def from_env(cls: type[Settings], environ: Mapping[str, str] | None = None) -> Settings:
        """Read `RC_*` variables from `environ` (default: os.environ); unset or blank ones keep their default.
        Variables of settings this class does not declare are left alone (a bulk job ignores RC_WORKERS).
        Raises ValueError naming each bad variable and its value, or a retired one and why."""
        environ = os.environ if environ is None else environ
        refuse_retired(environ)
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


def refuse_retired(environ: Mapping[str, str]) -> None:
    """Raise ValueError for a set (non-blank) retired variable, saying what replaced it."""
    found = [f"{key}={value!r}: {RETIRED_VARIABLES[key.upper()]}" for key, value in environ.items()
             if key.upper() in RETIRED_VARIABLES and value.strip()]
    if found:
        raise ValueError("; ".join(found))


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
