"""The service's API as the load commands call it: BentoML's generated client for everything it can
express, and how a failed call is named in the reports ("<status> <error code>")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import bentoml
from bentoml.exceptions import BentoMLException


def classify_uploads(client: bentoml.SyncHTTPClient, paths: Sequence[Path]) -> Any:
    """One photo -> /classify upload; several -> one /classify_batch request. Raises on a non-2xx answer."""
    if len(paths) == 1:
        return client.classify(image=paths[0])
    return client.classify_batch(images=list(paths))


def classify_url(client: bentoml.SyncHTTPClient, url: str) -> Any:
    return client.classify(image_url=url)


def error_code_of(exc: BaseException) -> str:
    """'422 corrupt_image' for an HTTP error answer with the service's JSON envelope, '503' without one,
    the exception's type for failures without an answer (connection refused or reset, timeouts)."""
    if isinstance(exc, BentoMLException) and getattr(exc, "error_code", None) is not None:
        status = int(exc.error_code)
        code = error_code_from_body(str(exc.message))
        return f"{status} {code}" if code else str(status)
    return type(exc).__name__


def error_code_from_body(body: str) -> str | None:
    """The `error.code` of the service's `{"error": {"code": ..., "message": ...}}` body, if it is one."""
    try:
        payload = json.loads(body)
    except (ValueError, TypeError):
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    return error.get("code") if isinstance(error, dict) else None
