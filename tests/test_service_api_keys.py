"""API keys on a real `bentoml serve` (RC_API_KEYS_FILE), through BentoML's generated client and plain HTTP.

Keys are made and revoked with the real command (`python -m serving.api_keys`), which writes only their
hashes. Covered: open probes, no key / wrong key / revoked key (the file edited while the server runs), a
batch charged per image, the daily quota, one key flooding at 10x its rate while another's requests all
succeed, unknown vs near-miss keys taking the same time, per-key metrics, and no key in the server log.
The flood and timing tests bound their request counts and compare rates and orders of magnitude, never a
fixed number of milliseconds: the machine they run on is shared.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import bentoml
import pytest
import requests

from serving.api_keys import KEY_PREFIX, hash_key, make_key
from testkit.images import encode, noisy_image
from testkit.model_home import TinyModel
from testkit.server import REPO_ROOT, BentoServer, serve_model_home

# name -> (rate, burst, daily quota) of each key the test server knows
KEYS = {
    "steady": ("50", "50", None),  # the well-behaved partner
    "flood": ("2", "2", None),  # floods at 10x its rate
    "batcher": ("0.01", "4", None),  # 4 images at once, then 100 s per image: no refill during the test
    "daily": ("100", "100", "2"),  # 2 images a day
    "revoked": ("50", "50", None),  # revoked while the server runs
}
FLOOD_RATE = 2.0
FLOOD_SECONDS = 5.0
FLOOD_REQUESTS = int(FLOOD_SECONDS * FLOOD_RATE * 10)  # 10x its rate for 5 s: 100 requests, bounded
TIMING_TRIES = 200


def keys_command(*args: str, keys_file: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.api_keys", *args, "--file", str(keys_file)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True)


def new_key(keys_file: Path, name: str, rate: str, burst: str, daily: str | None) -> str:
    extra = ["--daily-quota", daily] if daily else []
    return keys_command("new-key", name, "--rate", rate, "--burst", burst, *extra, keys_file=keys_file).stdout.strip()


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys") / "api_keys.json"


@pytest.fixture(scope="module")
def keys(keys_file: Path) -> dict[str, str]:
    return {name: new_key(keys_file, name, *quota) for name, quota in KEYS.items()}


@pytest.fixture(scope="module")
def keyed_server(tiny_model: TinyModel, keys: dict[str, str], keys_file: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[BentoServer]:
    with serve_model_home(tiny_model.home, tmp_path_factory.mktemp("keyed") / "server.log",
                          RC_API_KEYS_FILE=str(keys_file)) as server:
        yield server


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "room.jpg"
    path.write_bytes(encode(noisy_image((96, 72), seed=5), "JPEG"))
    return path


def error_of(call: Callable[[], Any]) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of a request the generated client reports as failed."""
    with pytest.raises(bentoml.exceptions.BentoMLException) as caught:
        call()
    return int(caught.value.error_code), json.loads(str(caught.value))


def post_photo(server: BentoServer, photo: Path, headers: dict[str, str], path: str = "/classify",
               session: requests.Session | None = None) -> requests.Response:
    field = "image" if path == "/classify" else "images"
    return (session or requests).post(server.url + path, headers=headers, timeout=30,
                                      files=[(field, (photo.name, photo.read_bytes(), "image/jpeg"))])


# ---- what stays open, what needs a key -------------------------------------------------------------


def test_probes_health_and_metrics_stay_open(keyed_server: BentoServer) -> None:
    for path in ("/health", "/readyz", "/livez", "/metrics", "/"):
        assert requests.get(keyed_server.url + path, timeout=10).status_code == 200, path
    assert requests.get(keyed_server.url + "/health", timeout=10).json()["config"]["api_key_required"] is True


@pytest.mark.parametrize("path", ["/classify", "/classify_batch"])
def test_no_key_is_401_missing_api_key(keyed_server: BentoServer, photo: Path, path: str) -> None:
    with keyed_server.client() as client:
        call = client.classify if path == "/classify" else client.classify_batch
        status, body = error_of(lambda: call(image=photo) if path == "/classify" else call(images=[photo]))
    assert (status, body["error"]["code"]) == (401, "missing_api_key")
    raw = post_photo(keyed_server, photo, {"Authorization": "Basic dXNlcjpwYXNz"}, path)  # not a Bearer key
    assert raw.status_code == 401 and raw.json()["error"]["code"] == "missing_api_key"
    assert raw.headers["WWW-Authenticate"].startswith("Bearer")


def test_wrong_and_unknown_keys_are_401_invalid_api_key(keyed_server: BentoServer, keys: dict[str, str],
                                                        photo: Path) -> None:
    near_miss = keys["steady"][:-1] + ("A" if keys["steady"][-1] != "A" else "B")
    for wrong in (near_miss, make_key(), "x"):
        with keyed_server.client(token=wrong) as client:
            status, body = error_of(lambda: client.classify(image=photo))
        assert (status, body["error"]["code"]) == (401, "invalid_api_key")
        assert wrong not in json.dumps(body)
        raw = post_photo(keyed_server, photo, {"X-API-Key": wrong})
        assert raw.status_code == 401 and raw.json()["error"]["code"] == "invalid_api_key"


def test_a_key_works_as_bearer_token_and_as_x_api_key(keyed_server: BentoServer, keys: dict[str, str],
                                                      photo: Path) -> None:
    with keyed_server.client(token=keys["steady"]) as client:
        answer = client.classify(image=photo)
        batch = client.classify_batch(images=[photo, photo])
    assert answer["class"] and [item["result"]["class"] for item in batch["results"]] == [answer["class"]] * 2
    raw = post_photo(keyed_server, photo, {"X-API-Key": keys["steady"]})
    assert raw.status_code == 200 and raw.json()["class"] == answer["class"]


# ---- quotas ------------------------------------------------------------------------------------------


def test_a_batch_is_charged_per_image(keyed_server: BentoServer, keys: dict[str, str], photo: Path) -> None:
    """The batcher key may send 4 images at once and then 1 per 100 s."""
    with keyed_server.client(token=keys["batcher"]) as client:
        status, body = error_of(lambda: client.classify_batch(images=[photo] * 5))  # more than its burst
        assert (status, body["error"]["code"]) == (400, "too_many_images")
        assert len(client.classify_batch(images=[photo] * 3)["results"]) == 3  # 1 image left
        raw = requests.post(keyed_server.url + "/classify_batch", headers={"X-API-Key": keys["batcher"]}, timeout=30,
                            files=[("images", (photo.name, photo.read_bytes(), "image/jpeg"))] * 2)
        assert raw.status_code == 429 and raw.json()["error"]["code"] == "quota_exceeded"
        assert int(raw.headers["Retry-After"]) >= 90  # 1 more image at 0.01 per second
        client.classify(image=photo)  # the refused batch paid nothing: the last image is still there
        status, body = error_of(lambda: client.classify(image=photo))
        assert (status, body["error"]["code"]) == (429, "quota_exceeded")


def test_the_daily_quota_refuses_until_midnight_utc(keyed_server: BentoServer, keys: dict[str, str],
                                                   photo: Path) -> None:
    with keyed_server.client(token=keys["daily"]) as client:
        client.classify_batch(images=[photo, photo])
    raw = post_photo(keyed_server, photo, {"Authorization": f"Bearer {keys['daily']}"})
    assert raw.status_code == 429 and raw.json()["error"]["code"] == "quota_exceeded"
    assert "today" in raw.json()["error"]["message"] and 1 <= int(raw.headers["Retry-After"]) <= 86_400


def test_a_revoked_key_stops_within_seconds(keyed_server: BentoServer, keys: dict[str, str], keys_file: Path,
                                            photo: Path) -> None:
    headers = {"Authorization": f"Bearer {keys['revoked']}"}
    assert post_photo(keyed_server, photo, headers).status_code == 200
    keys_command("revoke-key", "revoked", keys_file=keys_file)
    revoked_at = time.monotonic()
    while (status := post_photo(keyed_server, photo, headers).status_code) == 200 and \
            time.monotonic() - revoked_at < 15:
        time.sleep(0.2)
    assert status == 401, f"the revoked key still works {time.monotonic() - revoked_at:.1f} s after revoking it"
    print(f"revoked key refused {time.monotonic() - revoked_at:.2f} s after the file changed")
    assert post_photo(keyed_server, photo, {"Authorization": f"Bearer {keys['steady']}"}).status_code == 200


def test_a_flooding_key_gets_429s_while_another_key_is_served(keyed_server: BentoServer, keys: dict[str, str],
                                                               photo: Path) -> None:
    """`flood` sends 10x its rate for 5 s (100 requests, 4 at a time); `steady` keeps sending 5 a second."""
    flood_headers = {"Authorization": f"Bearer {keys['flood']}"}
    statuses: list[int] = []
    answers: list[requests.Response] = []
    lock = threading.Lock()
    started = time.monotonic()

    def flood_one(index: int) -> None:
        time.sleep(max(0.0, started + index / (FLOOD_RATE * 10) - time.monotonic()))
        response = post_photo(keyed_server, photo, flood_headers)
        with lock:
            statuses.append(response.status_code)
            answers.append(response)

    with keyed_server.client(token=keys["steady"]) as client:
        before = steady_latencies(client, photo, count=10, interval_s=0.05)
        with ThreadPoolExecutor(max_workers=4) as pool:
            flood = [pool.submit(flood_one, index) for index in range(FLOOD_REQUESTS)]
            during = steady_latencies(client, photo, count=25, interval_s=0.2)  # raises on any refusal
            for future in flood:
                future.result()
    flood_seconds = time.monotonic() - started
    accepted, refused = statuses.count(200), statuses.count(429)
    print(f"flood: {accepted} accepted, {refused} refused in {flood_seconds:.1f} s; steady p50 "
          f"{statistics.median(before) * 1000:.1f} ms before, {statistics.median(during) * 1000:.1f} ms during")
    assert len(statuses) == FLOOD_REQUESTS and set(statuses) <= {200, 429}, sorted(set(statuses))
    assert refused > 0 and accepted <= 2 + FLOOD_RATE * flood_seconds + 1  # its burst, then its rate
    refusal = next(answer for answer in answers if answer.status_code == 429)
    assert refusal.json()["error"]["code"] == "quota_exceeded" and int(refusal.headers["Retry-After"]) >= 1
    assert len(during) == 25  # every steady request answered 200
    # the same order of magnitude as without the flood (the refusals cost the server little)
    assert statistics.median(during) <= 10 * statistics.median(before) + 0.25


def steady_latencies(client: bentoml.SyncHTTPClient, photo: Path, count: int, interval_s: float) -> list[float]:
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        client.classify(image=photo)
        latencies.append(time.perf_counter() - started)
        time.sleep(interval_s)
    return latencies


def test_unknown_and_near_miss_keys_take_the_same_time(keyed_server: BentoServer, keys: dict[str, str]) -> None:
    """Both are hashed and compared with every stored hash in constant time: no faster 'no'."""
    near_miss = keys["steady"][:-1] + ("A" if keys["steady"][-1] != "A" else "B")
    timings: dict[str, list[float]] = {"near_miss": [], "unknown": []}
    for _ in range(TIMING_TRIES):  # interleaved, so the machine's load falls on both alike
        for kind, key in (("near_miss", near_miss), ("unknown", make_key())):
            started = time.perf_counter()
            response = requests.post(keyed_server.url + "/classify", json={}, timeout=10,
                                     headers={"Authorization": f"Bearer {key}"})
            timings[kind].append(time.perf_counter() - started)
            assert response.json()["error"]["code"] == "invalid_api_key"
    near, unknown = statistics.median(timings["near_miss"]), statistics.median(timings["unknown"])
    print(f"median 401: near miss {near * 1000:.2f} ms, unknown {unknown * 1000:.2f} ms over {TIMING_TRIES} tries")
    assert 0.1 < near / unknown < 10


# ---- metrics, logs, start-up ------------------------------------------------------------------------


def test_metrics_count_requests_and_images_per_key_name(keyed_server: BentoServer, keys: dict[str, str],
                                                        photo: Path) -> None:
    with keyed_server.client(token=keys["steady"]) as client:
        client.classify_batch(images=[photo] * 3)
    post_photo(keyed_server, photo, {})
    metrics = requests.get(keyed_server.url + "/metrics", timeout=10).text
    assert 'rc_api_key_requests_total{key="steady",status="200"}' in metrics
    assert 'rc_api_key_requests_total{key="",status="401"}' in metrics
    images = [line for line in metrics.splitlines() if line.startswith('rc_api_key_images_total{key="steady"}')]
    assert images and float(images[0].split()[-1]) >= 3
    assert not any(key in metrics or hash_key(key) in metrics for key in keys.values())


def test_the_server_log_holds_no_key(keyed_server: BentoServer, keys: dict[str, str], photo: Path) -> None:
    for key in keys.values():  # valid, over quota, revoked: each one sent in both headers
        post_photo(keyed_server, photo, {"Authorization": f"Bearer {key}"})
        post_photo(keyed_server, photo, {"X-API-Key": key})
    log = keyed_server.log()
    assert "/classify" in log  # the access log is there, so the absence below means something
    assert KEY_PREFIX not in log
    assert not any(key in log or hash_key(key) in log for key in keys.values())


def test_a_bad_keys_file_stops_the_service_at_start_up(tiny_model: TinyModel, tmp_path: Path) -> None:
    bad = tmp_path / "keys.json"
    plain_key = make_key()
    bad.write_text(json.dumps({"keys": [{"name": "oops", "sha256": plain_key, "rate": 1}]}))  # a key, not a hash
    env = {key: value for key, value in os.environ.items() if not key.startswith("RC_")}
    env.update(BENTOML_HOME=str(tiny_model.home), BENTOML_DO_NOT_TRACK="true", RC_API_KEYS_FILE=str(bad))
    result = subprocess.run([sys.executable, "-m", "bentoml", "serve", "service:RoomClassifier", "--host",
                             "127.0.0.1", "--port", "1"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert f"API keys file {bad}: keys.0.sha256" in result.stderr
    assert plain_key not in result.stderr + result.stdout
