"""Error types with stable machine-readable codes, and their HTTP mapping.

Decoding and URL fetching raise `InputError(code, message)` (a `ServiceError`; the service raises other
`ServiceError`s for overload and an unavailable model). `code` is stable and machine-readable
(clients branch on it), `message` is for humans. The service turns it into a 4xx answer with the body
`{"error": {"code": ..., "message": ...}}`; `http_status(code)` says which 4xx.
"""

from __future__ import annotations

from typing import Any

# code -> HTTP status. Every code the service can answer with is listed here, so the table doubles as
# the reference for clients. Codes are never renamed; new ones may be added.
ERROR_STATUS: dict[str, int] = {
    # request shape
    "invalid_request": 400,  # body does not match the API schema (missing field, wrong type, ...)
    "invalid_upload": 400,  # malformed multipart body, or a file field that is not a file
    "missing_image": 400,  # no image in the request
    "conflicting_inputs": 400,  # image_url and an upload in the same single-image request
    "too_many_images": 400,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_too_large": 413,  # whole request body over RC_MAX_REQUEST_BYTES
    "unsupported_media_type": 415,
    # URLs
    "invalid_url": 400,
    "url_scheme_not_allowed": 400,
    "url_host_not_allowed": 403,  # private, loopback, link-local, ... address (SSRF guard)
    "url_fetch_disabled": 403,
    "url_unresolvable": 422,
    "too_many_redirects": 422,
    "fetch_failed": 422,  # connection refused, TLS error, HTTP error status from the image host
    "fetch_timeout": 422,
    # images
    "empty_image": 400,
    "image_too_large": 413,  # bytes
    "image_too_many_pixels": 413,  # width x height, read from the header before decoding
    "unsupported_image_format": 415,  # a known image format that is not on the allow-list
    "not_an_image": 415,
    "corrupt_image": 422,  # truncated or broken image data
    # server side
    "overloaded": 429,
    "model_overloaded": 503,
    "model_unavailable": 503,
    "timeout": 504,
    "internal_error": 500,
}


class ServiceError(Exception):
    """An answer other than a result: a stable `code` (see ERROR_STATUS) and a human `message`."""

    def __init__(self, code: str, message: str) -> None:
        if code not in ERROR_STATUS:
            raise ValueError(f"unknown error code {code!r}: add it to ERROR_STATUS")
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def status(self) -> int:
        return http_status(self.code)

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}

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
    return {"error": {"code": code, "message": message, **extra}}
