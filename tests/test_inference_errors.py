"""Error codes live in one enum with their statuses; answers are made in one place with one Retry-After."""

from __future__ import annotations

import json

import pytest

from inference.errors import (
    ERROR_STATUS,
    ErrorCode,
    InputError,
    ServiceError,
    error_body,
    error_response,
    service_error_response,
)


def test_every_code_has_an_error_status_and_serialises_as_its_name() -> None:
    assert len({code.value for code in ErrorCode}) == len(ErrorCode)
    for code in ErrorCode:
        assert 400 <= code.status < 600
        assert ERROR_STATUS[code.value] == code.status
        assert json.loads(json.dumps(error_body(code, "m")))["error"]["code"] == code.value


def test_a_misspelt_code_fails_where_it_is_raised() -> None:
    with pytest.raises(ValueError, match="unknown error code"):
        InputError("not_an_imag", "typo")
    assert InputError("not_an_image", "a string still works").code is ErrorCode.NOT_AN_IMAGE


@pytest.mark.parametrize("code, retry_after", [(ErrorCode.OVERLOADED, "2"), (ErrorCode.MODEL_UNAVAILABLE, "2"),
                                               (ErrorCode.NOT_AN_IMAGE, None)])
def test_retry_after_only_where_a_retry_helps_and_only_once(code: ErrorCode, retry_after: str | None) -> None:
    response = service_error_response(ServiceError(code, "m"), retry_after_s=2)
    assert response.status_code == code.status
    assert response.headers.getlist("retry-after") == ([retry_after] if retry_after else [])
    again = error_response(code.status, error_body(code, "m"), 2, {"retry-after": "7"})
    assert again.headers.getlist("retry-after") == ["7"]  # a Retry-After already there is kept, not doubled
