"""A corrupt model keeps the service up but not ready, with a clear log line; a missing one stops
`bentoml serve` at once with a clear message (BentoML resolves models before serving). A request over
RC_REQUEST_TIMEOUT_S gets a 504 in our error envelope."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import bentoml
import pytest
import requests

from testkit.image_host import ImageHost
from testkit.model_home import TinyModel
from testkit.server import REPO_ROOT, BentoServer, serve_model_home

REGISTER_CORRUPT = """
import sys
from pathlib import Path
from training.register import save_to_model_store
from testkit.tiny_model import tiny_metadata
path = Path(sys.argv[1])
path.write_bytes(b"\\x08\\x07definitely not an onnx graph" * 100)
print(save_to_model_store(path, tiny_metadata()))
"""


@pytest.fixture(scope="module")
def corrupt_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BentoServer]:
    home = tmp_path_factory.mktemp("corrupt_home")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    subprocess.run([sys.executable, "-c", REGISTER_CORRUPT, str(home / "model.onnx")], cwd=REPO_ROOT, env=env,
                   check=True, capture_output=True, timeout=120)
    with serve_model_home(home, home / "server.log", ready_path="/livez") as server:
        yield server


def test_corrupt_model_is_up_but_never_ready(corrupt_server: BentoServer) -> None:
    for _ in range(4):
        assert requests.get(corrupt_server.url + "/livez", timeout=5).status_code == 200
        assert requests.get(corrupt_server.url + "/readyz", timeout=5).status_code == 503
        time.sleep(0.5)
    assert corrupt_server.alive()
    log = corrupt_server.log()
    assert "MODEL NOT LOADED" in log and "ONNX Runtime cannot load model.onnx" in log
    assert log.count("Service room_classifier initialized") == 1  # not restarting in a loop


def test_corrupt_model_health_and_classify_say_why(corrupt_server: BentoServer, tmp_path: Path) -> None:
    health = requests.get(corrupt_server.url + "/health", timeout=10)
    assert health.status_code == 503, health.text
    assert health.json()["status"] == "unavailable" and "cannot load" in health.json()["error"], health.text
    image = tmp_path / "x.jpg"
    image.write_bytes(b"anything")
    with corrupt_server.client(wait_ready=False) as client:
        with pytest.raises(bentoml.exceptions.ServiceUnavailable) as caught:
            client.classify(image=image)
    assert json.loads(str(caught.value))["error"]["code"] == "model_unavailable"
    raw = requests.post(corrupt_server.url + "/classify", json={"image_url": "http://localhost/x.jpg"}, timeout=10)
    assert raw.status_code == 503 and raw.headers["Retry-After"] == "1"


def test_missing_model_stops_serve_with_a_clear_message(tiny_model, tmp_path: Path) -> None:
    env = {**os.environ, "BENTOML_HOME": str(tiny_model.home), "BENTOML_DO_NOT_TRACK": "true",
           "RC_MODEL_TAG": "room_classifier:nosuchversion"}
    result = subprocess.run([sys.executable, "-m", "bentoml", "serve", "service:RoomClassifier", "--host",
                             "127.0.0.1", "--port", "1"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "MODEL room_classifier:nosuchversion NOT FOUND" in result.stderr


@pytest.fixture(scope="module")
def impatient_server(tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BentoServer]:
    """A 1 s request timeout, and URL fetches allowed to take much longer: the request timeout comes first."""
    folder = tmp_path_factory.mktemp("impatient")
    with serve_model_home(tiny_model.home, folder / "server.log", RC_REQUEST_TIMEOUT_S="1",
                          RC_URL_ALLOWLIST="localhost", RC_FETCH_TOTAL_TIMEOUT_S="8",
                          RC_FETCH_READ_TIMEOUT_S="5") as server:
        yield server


@pytest.mark.parametrize("path, body", [("/classify", "image_url"), ("/classify_batch", "image_urls")])
def test_request_timeout_answers_504_in_our_envelope(impatient_server: BentoServer, image_host: ImageHost,
                                                     path: str, body: str) -> None:
    url = image_host.url("/slow")  # a byte every 0.3 s: only the total fetch timeout (8 s) would stop it
    started = time.monotonic()
    response = requests.post(impatient_server.url + path, json={body: url if body == "image_url" else [url, url]},
                             timeout=30)
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "timeout" and "1 s" in response.json()["error"]["message"]
    assert time.monotonic() - started < 4.0
    assert requests.get(impatient_server.url + "/health", timeout=10).status_code == 200
