"""Error types with stable machine-readable codes, and their HTTP mapping.

Decoding and URL fetching raise `InputError(code, message)` (a `ServiceError`; the service raises other
`ServiceError`s for overload and an unavailable model). `code` is stable and machine-readable
(clients branch on it), `message` is for humans. The service turns it into a 4xx answer with the body
`{"error": {"code": ..., "message": ...}}` (`error_response`, the one place answers are made); each
`ErrorCode` carries its HTTP status.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from starlette.responses import JSONResponse


class ErrorCode(StrEnum):
    """Every code an answer can carry, with its HTTP status: the reference for clients. Codes are never
    renamed; new ones may be added. Members are strings, so they compare with and serialise as their code."""

    status: int

    def __new__(cls, code: str, status: int) -> "ErrorCode":
        member = str.__new__(cls, code)
        member._value_ = code
        member.status = status
        return member

    # request shape
    INVALID_REQUEST = "invalid_request", 400  # body does not match the API schema (missing field, wrong type, ...)
    INVALID_UPLOAD = "invalid_upload", 400  # malformed multipart body, or a file field that is not a file
    MISSING_IMAGE = "missing_image", 400  # no image in the request
    CONFLICTING_INPUTS = "conflicting_inputs", 400  # image_url and an upload in the same single-image request
    TOO_MANY_IMAGES = "too_many_images", 400
    # API keys (only when RC_API_KEYS_FILE is set)
    MISSING_API_KEY = "missing_api_key", 401  # no `Authorization: Bearer <key>` nor `X-API-Key`
    INVALID_API_KEY = "invalid_api_key", 401  # unknown or revoked key
    QUOTA_EXCEEDED = "quota_exceeded", 429  # over the key's rate or daily quota; Retry-After says when to retry
    NOT_FOUND = "not_found", 404
    METHOD_NOT_ALLOWED = "method_not_allowed", 405
    REQUEST_TOO_LARGE = "request_too_large", 413  # whole request body over RC_MAX_REQUEST_BYTES
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type", 415
    # URLs
    INVALID_URL = "invalid_url", 400
    URL_SCHEME_NOT_ALLOWED = "url_scheme_not_allowed", 400
    URL_HOST_NOT_ALLOWED = "url_host_not_allowed", 403  # private, loopback, link-local, ... address (SSRF guard)
    URL_FETCH_DISABLED = "url_fetch_disabled", 403
    URL_UNRESOLVABLE = "url_unresolvable", 422
    TOO_MANY_REDIRECTS = "too_many_redirects", 422
    FETCH_FAILED = "fetch_failed", 422  # connection refused, TLS error, HTTP error status from the image host
    FETCH_TIMEOUT = "fetch_timeout", 422
    # images
    EMPTY_IMAGE = "empty_image", 400
    IMAGE_TOO_LARGE = "image_too_large", 413  # bytes
    IMAGE_TOO_MANY_PIXELS = "image_too_many_pixels", 413  # width x height, read from the header before decoding
    UNSUPPORTED_IMAGE_FORMAT = "unsupported_image_format", 415  # a known image format that is not on the allow-list
    NOT_AN_IMAGE = "not_an_image", 415
    CORRUPT_IMAGE = "corrupt_image", 422  # truncated or broken image data
    # what the model can do
    EXPLAIN_NOT_SUPPORTED = "explain_not_supported", 422  # explain=true, but the model has no activation maps
    # server side
    OVERLOADED = "overloaded", 429
    MODEL_OVERLOADED = "model_overloaded", 503
    MODEL_UNAVAILABLE = "model_unavailable", 503
    TIMEOUT = "timeout", 504
    INTERNAL_ERROR = "internal_error", 500


# code -> HTTP status, for clients and tests that read the table as data
ERROR_STATUS: dict[str, int] = {code.value: code.status for code in ErrorCode}
# The code an answer gets when something other than this project refused it (BentoML's validation, Starlette's
# routing), by status; other 4xx are invalid_request, other 5xx internal_error.
CODE_FOR_STATUS: dict[int, ErrorCode] = {
    400: ErrorCode.INVALID_REQUEST, 404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.REQUEST_TOO_LARGE, 415: ErrorCode.UNSUPPORTED_MEDIA_TYPE, 422: ErrorCode.INVALID_REQUEST,
    429: ErrorCode.OVERLOADED, 503: ErrorCode.MODEL_UNAVAILABLE, 504: ErrorCode.TIMEOUT}
RETRY_LATER = frozenset({429, 503})  # the statuses that tell the client to come back: they carry Retry-After


class ServiceError(Exception):
    """An answer other than a result: a stable `code` (see ERROR_STATUS) and a human `message`;
    `retry_after_s`, when the error knows it (a key's quota), overrides the configured Retry-After."""

    def __init__(self, code: ErrorCode, message: str, retry_after_s: int | None = None) -> None:
        if code not in ERROR_STATUS:
            raise ValueError(f"unknown error code {code!r}: add it to ErrorCode")
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.retry_after_s = retry_after_s

    @property
    def status(self) -> int:
        return self.code.status

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class InputError(ServiceError):
    """A request input the service refuses (bad URL, bad image, bad request shape): always a 4xx."""


class ModelLoadError(Exception):
    """The model in the store cannot be served (missing, corrupt, or metadata that does not fit it)."""


def http_status(code: str) -> int:
    """HTTP status for an error code (500 for codes nobody registered, which would be a bug)."""
    return ERROR_STATUS.get(code, 500)


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The JSON body of every error answer: `{"error": {"code", "message", ...}}`."""
    return {"error": {"code": str(code), "message": message, **extra}}


def error_response(status: int, body: dict[str, Any], retry_after_s: int | None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The one way an error answer is made: JSON, and Retry-After on the statuses that ask for a retry."""
    headers = dict(headers or {})
    if status in RETRY_LATER and retry_after_s is not None and "retry-after" not in map(str.lower, headers):
        headers["Retry-After"] = str(retry_after_s)
    return JSONResponse(body, status_code=status, headers=headers)


def service_error_response(error: ServiceError, retry_after_s: int | None, close: bool = False,
                           headers: dict[str, str] | None = None) -> JSONResponse:
    """A ServiceError as an HTTP answer (the error's own Retry-After first); `close` ends the connection after
    it (a refused body stays unread)."""
    headers = {**(headers or {}), **({"Connection": "close"} if close else {})}
    return error_response(error.status, error_body(error.code, error.message),
                          error.retry_after_s if error.retry_after_s is not None else retry_after_s, headers)
