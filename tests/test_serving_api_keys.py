"""The API keys module on its own: the keys file and its command, key lookup, token buckets, daily quotas and
reloading, with a clock and a calendar the test moves (the real service is tests/test_service_api_keys.py)."""

from __future__ import annotations

import datetime as dt
import json
import stat
from pathlib import Path

import pytest

from inference.errors import ErrorCode, ServiceError
from serving.api_keys import (
    CURRENT_ADMISSION,
    ApiKeys,
    KeysFileError,
    QuotaExceeded,
    add_key,
    hash_key,
    main,
    pay_for_batch,
    presented_key,
    read_keys_file,
    revoke_key,
)


class Clock:
    """A monotonic clock and a UTC calendar that move only when the test says."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.day = dt.date(2026, 1, 1)

    def __call__(self) -> float:
        return self.now

    def today(self) -> dt.date:
        return self.day


@pytest.fixture
def clock() -> Clock:
    return Clock()


def bearer(key: str) -> tuple[str, None]:
    return f"Bearer {key}", None


def test_new_key_prints_the_key_once_and_stores_only_its_hash(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "keys.json"
    assert main(["new-key", "partner-a", "--rate", "20", "--burst", "40", "--daily-quota", "1000",
                 "--file", str(path)]) == 0
    key = capsys.readouterr().out.strip()
    text = path.read_text()
    assert key.startswith("rck_") and len(key) > 40 and key not in text and hash_key(key) in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(text) == {"keys": [{"name": "partner-a", "sha256": hash_key(key), "rate": 20.0, "burst": 40,
                                          "daily_quota": 1000}]}
    assert main(["list-keys", "--file", str(path)]) == 0
    listed = capsys.readouterr().out
    assert "partner-a" in listed and hash_key(key) not in listed


def test_the_command_refuses_a_taken_name_bad_quotas_and_unknown_names(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "keys.json"
    add_key(path, "a", rate=1)
    assert main(["new-key", "a", "--rate", "1", "--file", str(path)]) == 2
    assert main(["new-key", "b", "--rate", "0", "--file", str(path)]) == 2
    assert main(["new-key", "bad name", "--rate", "1", "--file", str(path)]) == 2
    assert main(["revoke-key", "nobody", "--file", str(path)]) == 2
    errors = capsys.readouterr().err
    assert "a key named 'a' exists" in errors and "rate: Input should be greater than 0" in errors
    assert "no key named 'nobody'" in errors
    assert [key.name for key in read_keys_file(path)] == ["a"]


@pytest.mark.parametrize("content, problem", [
    ("not json", "not JSON"),
    ('{"keys": [{"name": "a", "sha256": "rck_plainkeyplainkey", "rate": 1}]}', "keys.0.sha256: String should match"),
    ('{"keys": [{"name": "a", "sha256": "' + "0" * 64 + '", "rate": 1, "colour": "red"}]}', "keys.0.colour: Extra"),
    ('{"keys": [{"name": "a", "sha256": "' + "0" * 64 + '", "rate": 1}, {"name": "a", "sha256": "' + "1" * 64
     + '", "rate": 1}]}', "two keys have the same name"),
])
def test_a_bad_file_is_refused_without_echoing_its_values(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(KeysFileError, match=problem) as caught:
        ApiKeys(path)
    assert "plainkey" not in str(caught.value) and "0" * 64 not in str(caught.value)
    with pytest.raises(KeysFileError, match="cannot read it"):
        ApiKeys(tmp_path / "missing.json")


@pytest.mark.parametrize("authorization, x_api_key, expected", [
    ("Bearer k1", None, "k1"), ("bearer  k1 ", "k2", "k1"), (None, " k2 ", "k2"), ("Basic abc", "k2", "k2"),
    ("Basic abc", None, None), ("Bearer ", None, None), (None, "", None), (None, None, None),
])
def test_the_key_comes_from_bearer_then_x_api_key(authorization: str | None, x_api_key: str | None,
                                                  expected: str | None) -> None:
    assert presented_key(authorization, x_api_key) == expected


def test_only_the_exact_key_is_admitted(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "keys.json"
    one, two = add_key(path, "one", rate=10), add_key(path, "two", rate=10)
    keys = ApiKeys(path, clock=clock, today=clock.today)
    assert keys.admit(*bearer(one)).key.name == "one" and keys.admit(None, two).key.name == "two"
    for wrong in (one[:-1], one + "x", one.upper(), hash_key(one)):
        with pytest.raises(ServiceError) as caught:
            keys.admit(*bearer(wrong))
        assert caught.value.code is ErrorCode.INVALID_API_KEY and wrong not in caught.value.message
    with pytest.raises(ServiceError) as caught:
        keys.admit(None, None)
    assert caught.value.code is ErrorCode.MISSING_API_KEY


def test_the_bucket_allows_the_burst_then_the_rate(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "keys.json"
    key = add_key(path, "k", rate=2, burst=3)
    keys = ApiKeys(path, clock=clock, today=clock.today)
    for _ in range(3):
        keys.admit(*bearer(key))
    with pytest.raises(QuotaExceeded) as caught:
        keys.admit(*bearer(key))
    assert caught.value.code is ErrorCode.QUOTA_EXCEEDED and caught.value.retry_after_s == 1
    assert caught.value.key_name == "k" and key not in caught.value.message
    clock.now += 0.5  # one image at 2 per second
    keys.admit(*bearer(key))
    with pytest.raises(QuotaExceeded):
        keys.admit(*bearer(key))
    clock.now += 3600  # a long pause refills the bucket to its burst, not beyond
    for _ in range(3):
        keys.admit(*bearer(key))
    with pytest.raises(QuotaExceeded):
        keys.admit(*bearer(key))


def test_a_batch_pays_per_image_and_a_refused_batch_pays_nothing(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "keys.json"
    key = add_key(path, "k", rate=1, burst=4)
    keys = ApiKeys(path, clock=clock, today=clock.today)

    def batch(images: int) -> None:
        admission = keys.admit(*bearer(key))
        token = CURRENT_ADMISSION.set(admission)
        try:
            pay_for_batch(images)
        finally:
            CURRENT_ADMISSION.reset(token)
        assert admission.images == images

    batch(3)  # 1 left
    with pytest.raises(QuotaExceeded) as caught:
        batch(2)
    assert caught.value.retry_after_s == 1  # 1 left + 1 a second: the refused batch gave its first image back
    with pytest.raises(ServiceError) as too_many:
        batch(5)
    assert too_many.value.code is ErrorCode.TOO_MANY_IMAGES
    clock.now += 1
    batch(2)
    pay_for_batch(16)  # with no admission (API keys off) nothing is charged or refused


def test_the_daily_quota_counts_images_per_utc_day(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "keys.json"
    key = add_key(path, "k", rate=100, daily_quota=3)
    keys = ApiKeys(path, clock=clock, today=clock.today)
    admission = keys.admit(*bearer(key))
    admission.pay_for(2)
    keys.admit(*bearer(key))
    with pytest.raises(QuotaExceeded, match="for today") as caught:
        keys.admit(*bearer(key))
    assert 1 <= caught.value.retry_after_s <= 86_400
    clock.day += dt.timedelta(days=1)
    keys.admit(*bearer(key))


def test_a_changed_file_is_reloaded_and_a_bad_edit_keeps_the_last_good_keys(tmp_path: Path, clock: Clock,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys.json"
    old = add_key(path, "old", rate=10)
    keys = ApiKeys(path, clock=clock, today=clock.today)
    new = add_key(path, "new", rate=10)
    revoke_key(path, "old")
    keys.admit(*bearer(old))  # looked at once a second at most: not yet
    clock.now += 1.0
    with pytest.raises(ServiceError, match="not valid"):
        keys.admit(*bearer(old))
    assert keys.admit(*bearer(new)).key.name == "new"
    path.write_text('{"keys": [')  # a half-written file
    clock.now += 1.0
    assert keys.admit(*bearer(new)).key.name == "new"
    assert "not JSON" in caplog.text and "the 1 keys read before stay in force" in caplog.text
    assert new not in caplog.text and hash_key(new) not in caplog.text
