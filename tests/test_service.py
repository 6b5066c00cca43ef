"""The service through a real `bentoml serve` and BentoML's generated client (bentoml.SyncHTTPClient).

Answers must equal the ONNX model's offline answers (same decode, preprocessing, ONNX file, softmax).
URL images come from a local HTTP server on 127.0.0.1, reached as `localhost` (the test server's
allow-list names that host, nothing else).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import bentoml
import pytest
import requests
from PIL import Image

from inference.decode import decode_image
from inference.model import OnnxClassifier
from inference.preprocess import draft_min_size
from serving.config import ServiceConfig
from testkit.image_host import ImageHost
from testkit.images import encode, noisy_image, solid_jpeg, write_solid_jpegs
from testkit.model_home import TinyModel
from testkit.photos import real_photos
from testkit.server import REPO_ROOT, BentoServer

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0)}
SETTINGS = ServiceConfig.from_env({"RC_MAX_PIXELS": "30000000"})  # the test server's decoder limit


@pytest.fixture(scope="module")
def client(server: BentoServer) -> bentoml.SyncHTTPClient:
    with server.client() as generated:
        yield generated


@pytest.fixture(scope="module")
def offline(tiny_model: TinyModel) -> OnnxClassifier:
    """The same ONNX file and metadata the server loaded, run in this process."""
    return OnnxClassifier.from_info(tiny_model.onnx_path, tiny_model.info)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Plain-colour JPEGs (one per class of the tiny model) plus a few real room photos, as files."""
    folder = tmp_path_factory.mktemp("photos")
    files = write_solid_jpegs(folder, COLOURS)
    for photo in real_photos(per_class=1):
        files[photo.stem] = photo
    files["large"] = folder / "large.jpg"  # decoded at reduced scale (the model's jpeg_draft)
    files["large"].write_bytes(encode(noisy_image((1600, 1200), seed=3), "JPEG", quality=90))
    return files


def expected(offline: OnnxClassifier, data: bytes, top_k: int = SETTINGS.default_top_k,
             threshold: float = SETTINGS.uncertain_threshold) -> dict[str, Any]:
    """The answer the API must give (its JSON field names), computed offline."""
    image = decode_image(data, SETTINGS.image_limits(), min_size=draft_min_size(offline.info.preprocessing))
    prediction = offline.predict([image], top_k, threshold)[0]
    return {"class": prediction.label, "confidence": prediction.confidence, "probabilities": prediction.probabilities,
            "top_k": prediction.top_k, "uncertain": prediction.uncertain, "model": offline.info.tag}


def assert_same_answer(answer: dict[str, Any], reference: dict[str, Any]) -> None:
    assert answer["class"] == reference["class"] and answer["model"] == reference["model"]
    assert answer["uncertain"] == reference["uncertain"]
    assert [label for label, _ in answer["probabilities"]] == [label for label, _ in reference["probabilities"]]
    for (_, served), (_, local) in zip(answer["probabilities"], reference["probabilities"]):
        assert served == pytest.approx(local, abs=1e-6)
    assert len(answer["top_k"]) == len(reference["top_k"])


def error_of(call: Callable[[], Any]) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of a request the generated client reports as failed."""
    with pytest.raises(bentoml.exceptions.BentoMLException) as caught:
        call()
    return int(caught.value.error_code), json.loads(str(caught.value))


# ---- health --------------------------------------------------------------------------------------------


def test_health_reports_model_and_labels(client: bentoml.SyncHTTPClient, tiny_model: TinyModel) -> None:
    response = client.request("GET", "/health")  # GET / is the web page (tests/test_web_page.py)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ok" and body["model"] == tiny_model.tag
    assert body["labels"] == tiny_model.metadata["labels"] and body["architecture"] == "tiny_gap_gemm"
    assert body["model_info"]["temperature"] == tiny_model.metadata["temperature"]


def test_bentoml_probes_stay_available(client: bentoml.SyncHTTPClient) -> None:
    assert client.request("GET", "/livez").status_code == 200
    assert client.request("GET", "/readyz").status_code == 200
    assert client.is_ready()
    assert "bentoml_service_request_total" in client.request("GET", "/metrics").text


# ---- classify ----------------------------------------------------------------------------------------


def test_upload_answers_equal_offline_answers(client: bentoml.SyncHTTPClient, offline: OnnxClassifier,
                                               photos: dict[str, Path]) -> None:
    for name, path in photos.items():
        answer = client.classify(image=path)
        assert_same_answer(answer, expected(offline, path.read_bytes()))
        if name in COLOURS:  # the tiny model's weights map plain colours to distinct classes
            assert answer["class"] == {"red": "bedroom", "green": "kitchen", "blue": "bathroom",
                                       "black": "living_room"}[name]


def test_url_answer_equals_offline_answer(client: bentoml.SyncHTTPClient, offline: OnnxClassifier,
                                          image_host: ImageHost, photos: dict[str, Path]) -> None:
    data = photos["green"].read_bytes()
    answer = client.classify(image_url=image_host.add("green.jpg", data))
    assert_same_answer(answer, expected(offline, data))


def test_seed_json_request_still_works(server: BentoServer, offline: OnnxClassifier, image_host: ImageHost) -> None:
    # Raw JSON on purpose: the generated client always sends multipart to an API with a file field,
    # and the seed's clients post {"image_url": ...} as JSON.
    data = solid_jpeg((0, 0, 255))
    response = requests.post(server.url + "/classify", json={"image_url": image_host.add("seed.jpg", data)},
                             timeout=30)
    assert response.status_code == 200, response.text
    assert_same_answer(response.json(), expected(offline, data))


def test_a_form_the_guard_leaves_to_bentoml_gets_the_same_answer(server: BentoServer, offline: OnnxClassifier,
                                                                  photos: dict[str, Path]) -> None:
    # top_k as a file part: the request guard passes such a form on as it came, and the upload reaches the
    # handler as BentoML's temp file instead of in memory.
    data = photos["red"].read_bytes()
    response = requests.post(server.url + "/classify", files={"image": ("red.jpg", data), "top_k": ("k.txt", b"2")},
                             timeout=30)
    assert response.status_code == 200, response.text
    assert_same_answer(response.json(), expected(offline, data, top_k=2))
    assert len(response.json()["top_k"]) == 2


def test_classify_routes_skip_bentoml_tracing_by_default(server: BentoServer, photos: dict[str, Path]) -> None:
    # RC_REQUEST_TRACING is off: BentoML's OpenTelemetry middleware (which sets this header) passes them by.
    response = requests.post(server.url + "/classify", files={"image": ("red.jpg", photos["red"].read_bytes())},
                             timeout=30)
    assert response.status_code == 200 and "x-bentoml-request-id" not in response.headers


def test_probabilities_are_a_sorted_softmax(client: bentoml.SyncHTTPClient, photos: dict[str, Path]) -> None:
    answer = client.classify(image=photos["red"])
    probabilities = [p for _, p in answer["probabilities"]]
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-9)
    assert probabilities == sorted(probabilities, reverse=True) and all(0 <= p <= 1 for p in probabilities)
    assert answer["confidence"] == probabilities[0] and answer["top_k"] == answer["probabilities"][:3]


def test_top_k_and_threshold(client: bentoml.SyncHTTPClient, photos: dict[str, Path]) -> None:
    one = client.classify(image=photos["red"], top_k=1, threshold=0.0)
    assert len(one["top_k"]) == 1 and one["uncertain"] is False
    everything = client.classify(image=photos["red"], top_k=100, threshold=1.0)
    assert len(everything["top_k"]) == 4 and everything["uncertain"] is True
    default = client.classify(image=photos["red"])
    assert len(default["top_k"]) == 3


def test_several_images_in_one_request(client: bentoml.SyncHTTPClient, offline: OnnxClassifier,
                                       image_host: ImageHost, photos: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"definitely not a jpeg")
    urls = [image_host.add("blue.jpg", photos["blue"].read_bytes()), image_host.url("/status/404")]
    uploads = [photos["red"], broken, photos["black"]]
    answer = client.classify_batch(image_urls=urls, images=uploads, top_k=2)
    results = answer["results"]
    assert answer["model"] == offline.info.tag
    assert [item["input"] for item in results] == ["image_urls[0]", "image_urls[1]", "images[0]", "images[1]",
                                                   "images[2]"]
    assert_same_answer(results[0]["result"], expected(offline, photos["blue"].read_bytes(), top_k=2))
    assert results[1]["error"]["code"] == "fetch_failed" and results[1]["result"] is None
    assert_same_answer(results[2]["result"], expected(offline, photos["red"].read_bytes(), top_k=2))
    assert results[3]["error"]["code"] == "not_an_image"
    assert_same_answer(results[4]["result"], expected(offline, photos["black"].read_bytes(), top_k=2))


def test_batches_larger_than_one_form_under_concurrent_load(server: BentoServer, photos: dict[str, Path]) -> None:
    """The batcher merges requests that arrive while the model runs. With the tiny model a run is short, so
    whether two requests meet there depends on timing: up to three rounds of load, and one merge is enough."""
    before = batch_histogram(server)
    local = threading.local()

    def classify_one(index: int) -> str:
        if not hasattr(local, "client"):
            local.client = server.client()
        return local.client.classify(image=photos[list(COLOURS)[index % 4]])["class"]

    requests_sent = 0
    for _ in range(3):
        with ThreadPoolExecutor(max_workers=16) as pool:
            classes = list(pool.map(classify_one, range(160)))
        requests_sent += 160
        assert len(classes) == 160 and set(classes) == {"bedroom", "kitchen", "bathroom", "living_room"}
        if requests.get(server.url + "/health", timeout=10).json()["batching"]["largest_batch"] > 1:
            break
    after = batch_histogram(server)
    # the service's histogram of images per model run (rc_batch_size, see serving/metrics.py)
    batches = after["count"] - before["count"]
    singles = after["le_1"] - before["le_1"]
    assert batches < requests_sent and singles < batches, (before, after)
    stats = requests.get(server.url + "/health", timeout=10).json()["batching"]
    assert stats["largest_batch"] > 1


def batch_histogram(server: BentoServer) -> dict[str, float]:
    text = requests.get(server.url + "/metrics", timeout=10).text
    lines = [line for line in text.splitlines() if line.startswith("rc_batch_size")]
    count = sum(float(line.split()[-1]) for line in lines if line.startswith("rc_batch_size_count"))
    le_1 = sum(float(line.split()[-1]) for line in lines if 'le="1.0"' in line)
    return {"count": count, "le_1": le_1}


# ---- bad requests: 4xx with a JSON error that says what is wrong ----------------------------------------


def test_missing_image(client: bentoml.SyncHTTPClient) -> None:
    status, body = error_of(lambda: client.classify())
    assert status == 400 and body["error"]["code"] == "missing_image"
    status, body = error_of(lambda: client.classify_batch())
    assert status == 400 and body["error"]["code"] == "missing_image"


def test_both_url_and_upload(client: bentoml.SyncHTTPClient, image_host: ImageHost, photos: dict[str, Path]) -> None:
    status, body = error_of(lambda: client.classify(image_url=image_host.url("/img/red.jpg"), image=photos["red"]))
    assert status == 400 and body["error"]["code"] == "conflicting_inputs"


@pytest.mark.parametrize("arguments, field", [({"top_k": "three"}, "top_k"), ({"top_k": 0}, "top_k"),
                                              ({"threshold": 2}, "threshold"), ({"image_url": 42}, "image_url")])
def test_wrong_types_and_ranges(client: bentoml.SyncHTTPClient, photos: dict[str, Path],
                                arguments: dict[str, Any], field: str) -> None:
    arguments = {"image": photos["red"], **arguments} if "image_url" not in arguments else arguments
    status, body = error_of(lambda: client.classify(**arguments))
    assert status == 400 and body["error"]["code"] == "invalid_request"
    assert field in body["error"]["message"]


def test_empty_and_malformed_bodies(server: BentoServer) -> None:
    # Raw requests: the generated client cannot send these.
    cases = [(b"", "application/json", "missing_image"), (b"{", "application/json", "invalid_request"),
             (b"[1, 2]", "application/json", "invalid_request"), (b"null", "application/json", "invalid_request"),
             (b'{"image_url": ["a", "b"]}', "application/json", "invalid_request")]
    for body, content_type, code in cases:
        response = requests.post(server.url + "/classify", data=body, headers={"Content-Type": content_type},
                                 timeout=30)
        assert response.status_code == 400 and response.json()["error"]["code"] == code, (body, response.text)


def test_not_an_image_and_unreachable_url(client: bentoml.SyncHTTPClient, tmp_path: Path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("shopping list: milk, eggs")
    status, body = error_of(lambda: client.classify(image=text))
    assert status == 415 and body["error"]["code"] == "not_an_image"
    status, body = error_of(lambda: client.classify(image_url="http://localhost:1/photo.jpg"))
    assert status == 422 and body["error"]["code"] == "fetch_failed"


def test_unknown_route_and_wrong_method_are_json(client: bentoml.SyncHTTPClient) -> None:
    missing = client.request("GET", "/nowhere")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = client.request("GET", "/classify")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def test_png_upload_with_jpg_name_is_classified_by_content(client: bentoml.SyncHTTPClient, tmp_path: Path) -> None:
    disguised = tmp_path / "photo.jpg"
    disguised.write_bytes(encode(Image.new("RGB", (200, 150), (0, 255, 0)), "PNG"))
    assert client.classify(image=disguised)["class"] == "kitchen"


def test_serving_code_never_imports_torch(tiny_model: TinyModel) -> None:
    code = "import sys, service; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))"
    env = {**os.environ, "BENTOML_HOME": str(tiny_model.home), "BENTOML_DO_NOT_TRACK": "true"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


