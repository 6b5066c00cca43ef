"""Optional API keys with per-key quotas, for public deployments (`RC_API_KEYS_FILE`; off when unset).

The keys file is JSON and holds no key, only each key's SHA-256 (a leaked file opens nothing):

    {"keys": [{"name": "partner-a", "sha256": "<64 hex>", "rate": 20, "burst": 40, "daily_quota": 100000}]}

`rate` is images per second, `burst` how many may come at once (a token bucket; default: the rate, at least
1), `daily_quota` images per UTC day (optional). A batch of N images costs N. Make and revoke keys with

    python -m serving.api_keys new-key NAME --rate 20 [--burst 40] [--daily-quota 100000] [--file PATH]
    python -m serving.api_keys revoke-key NAME [--file PATH]
    python -m serving.api_keys list-keys [--file PATH]

(`--file` defaults to $RC_API_KEYS_FILE). `new-key` prints the key once; only its hash is written.

`ApiKeys` is what the service holds: it checks a presented key against every hash with a constant-time
compare (an unknown key and a near miss take the same time), keeps one token bucket and one daily count per
key name, and re-reads the file when it changes (checked at most once a second), so a revoked key stops
within about a second and a new one works without a restart. A file that cannot be read or parsed at start-up
stops the service; a bad edit later keeps the last good keys (and logs why, never a key or a hash).
The buckets and counts live in each worker process's memory: with RC_WORKERS=N each worker allows the full
rate, and a restart starts a new day's count. Keys never reach a log: errors name keys by their `name` only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import sys
import tempfile
import time
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from inference.errors import ErrorCode, ServiceError

logger = logging.getLogger(__name__)

KEY_PREFIX = "rck_"  # makes a leaked key easy to recognise (secret scanners, log greps)
RELOAD_CHECK_S = 1.0  # how often the file's identity (mtime, size, inode) is looked at, at most
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # also a Prometheus label value: short, plain
WWW_AUTHENTICATE = 'Bearer realm="room_classifier"'


class KeysFileError(ValueError):
    """The keys file cannot be read or does not hold valid keys; the message says where and why."""


class QuotaExceeded(ServiceError):
    """429 `quota_exceeded` for the key called `key_name`, with the seconds after which a retry can succeed."""

    def __init__(self, key_name: str, message: str, retry_after_s: int) -> None:
        super().__init__(ErrorCode.QUOTA_EXCEEDED, message, retry_after_s=retry_after_s)
        self.key_name = key_name


class ApiKey(BaseModel):
    """One key as the file holds it: never the key itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN, description="who holds the key; shown in metrics and errors")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the key")
    rate: float = Field(gt=0, description="images per second, sustained")
    burst: Optional[int] = Field(None, ge=1, description="images at once (default: the rate, at least 1)")
    daily_quota: Optional[int] = Field(None, ge=1, description="images per UTC day (default: no daily limit)")

    @property
    def bucket_size(self) -> int:
        return self.burst if self.burst is not None else max(1, math.ceil(self.rate))


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[ApiKey] = Field(default_factory=list)

    @model_validator(mode="after")
    def names_and_hashes_are_unique(self) -> "KeysFile":
        for field in ("name", "sha256"):
            values = [getattr(key, field) for key in self.keys]
            if len(set(values)) != len(values):
                raise ValueError(f"two keys have the same {field}")
        return self


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def make_key() -> str:
    """A new key: 256 random bits, URL-safe, with a recognisable prefix."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key a request carries: `Authorization: Bearer <key>`, else `X-API-Key: <key>`; None when neither."""
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    return None


# ----------------------------------------------------------------------------------------------------
# The file


def read_keys_file(path: Path) -> list[ApiKey]:
    """The keys in `path`; KeysFileError saying what is wrong (without echoing values: they may be keys)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise KeysFileError(f"API keys file {path}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise KeysFileError(f"API keys file {path}: not JSON ({type(exc).__name__} at line "
                            f"{getattr(exc, 'lineno', '?')})") from None
    try:
        return KeysFile.model_validate(data).keys
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, error['loc'])) or 'file'}: {error['msg']}"
                             for error in exc.errors(include_input=False, include_url=False))
        raise KeysFileError(f"API keys file {path}: {problems}") from None


def write_keys_file(path: Path, keys: Sequence[ApiKey]) -> None:
    """Replace the file in one step (a running service never reads half a file), readable by its owner only."""
    text = json.dumps({"keys": [key.model_dump(exclude_none=True) for key in keys]}, indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def add_key(path: Path, name: str, rate: float, burst: int | None = None, daily_quota: int | None = None) -> str:
    """Make a key called `name`, store its hash in `path` (created if missing) and return the key itself."""
    keys = read_keys_file(path) if path.exists() else []
    if any(key.name == name for key in keys):
        raise KeysFileError(f"API keys file {path}: a key named {name!r} exists; revoke it first or pick another name")
    key = make_key()
    try:
        record = ApiKey(name=name, sha256=hash_key(key), rate=rate, burst=burst, daily_quota=daily_quota)
    except ValidationError as exc:
        raise KeysFileError("; ".join(f"{error['loc'][0]}: {error['msg']}"
                                      for error in exc.errors(include_input=False, include_url=False))) from None
    write_keys_file(path, [*keys, record])
    return key


def revoke_key(path: Path, name: str) -> None:
    keys = read_keys_file(path)
    kept = [key for key in keys if key.name != name]
    if len(kept) == len(keys):
        raise KeysFileError(f"API keys file {path}: no key named {name!r}")
    write_keys_file(path, kept)


# ----------------------------------------------------------------------------------------------------
# What the service holds


@dataclass
class Admission:
    """A request let in: its key, and how many images it has paid for so far."""

    keys: ApiKeys
    key: ApiKey
    images: int

    def pay_for(self, images: int) -> None:
        """A batch paid one image on arrival; once its images are counted it pays for all of them. Refused
        (QuotaExceeded, or TOO_MANY_IMAGES beyond the key's burst), it pays nothing: the image paid on arrival
        is given back, so Retry-After tells the truth."""
        paid, self.images = self.images, 0
        self.keys.charge(self.key, images, already_paid=paid)
        self.images = images


# The request being handled, set by ApiKeyMiddleware (None with API keys off)
CURRENT_ADMISSION: ContextVar[Admission | None] = ContextVar("room_classifier_admission", default=None)


def pay_for_batch(images: int) -> None:
    """With API keys on, the request being handled pays for all its `images` (it paid for one at the door)."""
    admission = CURRENT_ADMISSION.get()
    if admission is not None:
        admission.pay_for(images)


@dataclass
class Usage:
    """One key's token bucket and today's image count."""

    tokens: float
    refilled_at: float
    day: dt.date
    images_today: int = 0


def utc_today() -> dt.date:
    return dt.datetime.now(dt.timezone.utc).date()


def seconds_to_utc_midnight() -> int:
    now = dt.datetime.now(dt.timezone.utc)
    midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), tzinfo=dt.timezone.utc)
    return max(1, math.ceil((midnight - now).total_seconds()))


class ApiKeys:
    """The keys of one file, checked per request, with each key's usage; reloads the file when it changes."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic,
                 today: Callable[[], dt.date] = utc_today) -> None:
        self.path = path
        self.clock = clock
        self.today = today
        self.keys = read_keys_file(path)  # a bad file stops the service at start-up
        self.file_identity = self.identity()
        self.checked_at = clock()
        self.usage: dict[str, Usage] = {}
        logger.info("API keys on: %d keys from %s", len(self.keys), path)

    # ---- who is asking -------------------------------------------------------------------------------

    def admit(self, authorization: str | None, x_api_key: str | None) -> Admission:
        """The key of a request, charged one image; 401 or 429 as a ServiceError otherwise."""
        presented = presented_key(authorization, x_api_key)
        if presented is None:
            raise ServiceError(ErrorCode.MISSING_API_KEY,
                               "this server needs an API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`")
        key = self.find(presented)
        if key is None:
            raise ServiceError(ErrorCode.INVALID_API_KEY, "the API key is not valid (unknown or revoked)")
        self.charge(key, images=1)
        return Admission(keys=self, key=key, images=1)

    def find(self, presented: str) -> ApiKey | None:
        """The key whose hash matches; every stored hash is compared in constant time, with no early exit, so
        the time taken says nothing about how close a guess came or which key it was near."""
        self.reload_if_changed()
        digest = hash_key(presented).encode("ascii")
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.sha256.encode("ascii")):
                found = key
        return found

    # ---- quotas ---------------------------------------------------------------------------------------

    def charge(self, key: ApiKey, images: int, already_paid: int = 0) -> None:
        """Take `images` from the key's bucket and daily quota, of which `already_paid` were taken before.
        Refused: nothing is taken (`already_paid` is given back), and QuotaExceeded says when to retry."""
        usage = self.current_usage(key)
        usage.tokens = min(key.bucket_size, usage.tokens + already_paid)
        usage.images_today = max(0, usage.images_today - already_paid)
        if images > key.bucket_size:
            raise ServiceError(ErrorCode.TOO_MANY_IMAGES, f"{images} images; the key {key.name!r} allows at most "
                                                          f"{key.bucket_size} per request")
        if key.daily_quota is not None and usage.images_today + images > key.daily_quota:
            raise QuotaExceeded(key.name, f"the key {key.name!r} has used its {key.daily_quota} images for today "
                                          "(UTC)", seconds_to_utc_midnight())
        if usage.tokens < images:
            wait = max(1, math.ceil((images - usage.tokens) / key.rate))
            raise QuotaExceeded(key.name, f"the key {key.name!r} allows {key.rate:g} images per second "
                                          f"(bursts of {key.bucket_size}); retry after {wait} s", wait)
        usage.tokens -= images
        usage.images_today += images

    def current_usage(self, key: ApiKey) -> Usage:
        """The key's usage, its bucket refilled up to now and its count reset on a new UTC day."""
        now, today = self.clock(), self.today()
        usage = self.usage.get(key.name)
        if usage is None:
            usage = self.usage[key.name] = Usage(tokens=key.bucket_size, refilled_at=now, day=today)
        usage.tokens = min(key.bucket_size, usage.tokens + (now - usage.refilled_at) * key.rate)
        usage.refilled_at = now
        if usage.day != today:
            usage.day, usage.images_today = today, 0
        return usage

    # ---- reloading ------------------------------------------------------------------------------------

    def identity(self) -> tuple[int, int, int] | None:
        try:
            info = self.path.stat()
        except OSError:
            return None
        return info.st_mtime_ns, info.st_size, info.st_ino

    def reload_if_changed(self) -> None:
        """Re-read the file when its mtime, size or inode changed (looked at once a second at most)."""
        now = self.clock()
        if now - self.checked_at < RELOAD_CHECK_S:
            return
        self.checked_at = now
        identity = self.identity()
        if identity == self.file_identity:
            return
        self.file_identity = identity
        try:
            keys = read_keys_file(self.path)
        except KeysFileError as exc:
            logger.error("%s; the %d keys read before stay in force", exc, len(self.keys))
            return
        self.keys = keys
        logger.info("API keys reloaded: %d keys from %s", len(keys), self.path)


# ----------------------------------------------------------------------------------------------------
# Metrics


@functools.cache
def key_counters() -> tuple[Any, Any]:
    """Created on first use, inside a worker (BentoML sets the multiprocess metrics folder only then)."""
    import prometheus_client

    requests = prometheus_client.Counter("rc_api_key_requests", "Classify requests by API key name and HTTP status",
                                         labelnames=["key", "status"])
    images = prometheus_client.Counter("rc_api_key_images", "Images charged to each API key",
                                       labelnames=["key"])
    return requests, images


def count_request(key_name: str, status: int | None, images: int) -> None:
    """One request; `key_name` is "" when it had no valid key (keys themselves are never labels), `status`
    None when it ended without an answer (the client left)."""
    requests, charged = key_counters()
    requests.labels(key=key_name, status=str(status) if status else "none").inc()
    if images:
        charged.labels(key=key_name).inc(images)


# ----------------------------------------------------------------------------------------------------
# Command line


def keys_file_argument(value: str | None) -> Path:
    path = value or os.environ.get("RC_API_KEYS_FILE", "").strip()
    if not path:
        raise KeysFileError("name the keys file with --file or RC_API_KEYS_FILE")
    return Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.api_keys", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new-key", help="make a key, store its hash, print the key once")
    new.add_argument("name")
    new.add_argument("--rate", type=float, required=True, help="images per second")
    new.add_argument("--burst", type=int, help="images at once (default: the rate)")
    new.add_argument("--daily-quota", type=int, help="images per UTC day (default: unlimited)")
    revoke = commands.add_parser("revoke-key", help="remove a key (a running service drops it within seconds)")
    revoke.add_argument("name")
    commands.add_parser("list-keys", help="names and quotas (no hashes)")
    for command in commands.choices.values():
        command.add_argument("--file", help="the keys file (default: $RC_API_KEYS_FILE)")
    args = parser.parse_args(argv)
    try:
        path = keys_file_argument(args.file)
        if args.command == "new-key":
            key = add_key(path, args.name, args.rate, args.burst, args.daily_quota)
            print(key)
            print(f"key {args.name!r} added to {path}; it is shown only this once: store it now", file=sys.stderr)
        elif args.command == "revoke-key":
            revoke_key(path, args.name)
            print(f"key {args.name!r} removed from {path}", file=sys.stderr)
        else:
            for key in read_keys_file(path):
                print(f"{key.name}\trate {key.rate:g}/s\tburst {key.bucket_size}\tdaily {key.daily_quota or '-'}")
    except KeysFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
