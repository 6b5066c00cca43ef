"""Hostile inputs through the real server: nasty files, hostile URLs, malformed bodies, overload.

Every refusal must be a 4xx (or 429/503 under load) JSON error with a stable code, never a 500, and the
server must stay up. Files are built by the tests (testkit/images.py); URLs only ever point at the
loopback range, and the server's allow-list names only `localhost`, so every other spelling of the
loopback address must be refused before any connection is made.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import bentoml
import pytest
import requests
from PIL import Image

from data_prep.common import CLASSES
from inference.decode import decode_image
from inference.errors import ERROR_STATUS
from inference.model import OnnxClassifier
from serving.config import ServiceConfig
from testkit.image_host import ImageHost
from testkit.images import (
    animated_gif,
    encode,
    exif_rotated_jpeg,
    gif_with_huge_screen,
    jpeg_with_huge_header,
    noisy_image,
    png_bomb,
    png_with_huge_header,
    sixteen_bit_png,
    solid_jpeg,
    truncated,
)
from testkit.model_home import TinyModel
from testkit.server import BentoServer

LABELS = set(CLASSES)


@pytest.fixture(scope="module")
def client(server: BentoServer) -> bentoml.SyncHTTPClient:
    with server.client() as generated:
        yield generated


@pytest.fixture(autouse=True)
def server_survives(server: BentoServer) -> None:
    yield
    assert server.alive(), server.log()[-3000:]


def refusal(call: Callable[[], Any]) -> tuple[int, str]:
    with pytest.raises(bentoml.exceptions.BentoMLException) as caught:
        call()
    status, body = int(caught.value.error_code), json.loads(str(caught.value))
    assert set(body["error"]) >= {"code", "message"} and body["error"]["message"]
    assert status == ERROR_STATUS[body["error"]["code"]], body
    return status, body["error"]["code"]


# ---- hostile files ---------------------------------------------------------------------------------------


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG")


def palette_with_alpha() -> bytes:
    image = Image.new("P", (64, 64), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(0, (0, 0, 8, 64))
    return encode(image, "PNG", transparency=0)


REFUSED_FILES: dict[str, tuple[Callable[[], bytes], str]] = {
    "bomb-8000x8000.png": (lambda: png_bomb(8000, 8000), "image_too_many_pixels"),
    "header-100000x100000.png": (png_with_huge_header, "image_too_many_pixels"),
    "header-65000x65000.jpg": (jpeg_with_huge_header, "image_too_many_pixels"),
    "screen-65535x65535.gif": (gif_with_huge_screen, "image_too_many_pixels"),
    "truncated.jpg": (lambda: truncated(encode(noisy_image(), "JPEG")), "corrupt_image"),
    "truncated.png": (lambda: truncated(encode(noisy_image(), "PNG")), "corrupt_image"),
    "truncated.webp": (lambda: truncated(encode(noisy_image(), "WEBP")), "corrupt_image"),
    "empty.jpg": (lambda: b"", "empty_image"),
    "notes.jpg": (lambda: b"not an image, just text with a .jpg name", "not_an_image"),
    "drawing.svg": (lambda: b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>",
                    "not_an_image"),
    "page.jpg": (lambda: b"<html><img src=x onerror=alert(1)>\xff\xd8\xff\xe0</html>", "not_an_image"),
    "gifar.gif": (lambda: b"GIF89a/*" + b"\x00" * 20 + b"*/=alert(1);PK\x03\x04", "corrupt_image"),
    "scan.tiff": (lambda: encode(Image.new("RGB", (32, 32)), "TIFF"), "unsupported_image_format"),
    "photo.bmp": (lambda: encode(Image.new("RGB", (32, 32)), "BMP"), "unsupported_image_format"),
    "oversized.jpg": (lambda: solid_jpeg((1, 2, 3), (16, 16)) + os.urandom(5 << 20), "image_too_large"),
}

ACCEPTED_FILES: dict[str, tuple[Callable[[], bytes], str | None]] = {
    "cmyk.jpg": (cmyk_jpeg, "bedroom"),
    "sixteen-bit.png": (sixteen_bit_png, None),
    "palette-alpha.png": (palette_with_alpha, "bedroom"),
    "rgba.png": (lambda: encode(Image.new("RGBA", (64, 64), (0, 255, 0, 255)), "PNG"), "kitchen"),
    "grayscale.png": (lambda: encode(Image.new("L", (64, 64), 0), "PNG"), "living_room"),
    "animated.gif": (lambda: animated_gif((255, 0, 0), (0, 0, 255)), "bedroom"),  # first frame: red
    "exif-rotated.jpg": (exif_rotated_jpeg, None),
    "one-pixel.png": (lambda: encode(Image.new("RGB", (1, 1), (0, 0, 255)), "PNG"), "bathroom"),
    "strip-1x10000.png": (lambda: encode(Image.new("RGB", (1, 10000), (0, 255, 0)), "PNG"), "kitchen"),
    "strip-10000x1.png": (lambda: encode(Image.new("RGB", (10000, 1), (255, 0, 0)), "PNG"), "bedroom"),
    "png-named.jpg": (lambda: encode(Image.new("RGB", (64, 48), (0, 0, 255)), "PNG"), "bathroom"),
    "jpeg-plus-zip.jpg": (lambda: solid_jpeg((255, 0, 0), (64, 64)) + b"PK\x03\x04" + os.urandom(2000), "bedroom"),
}


@pytest.mark.parametrize("name", list(REFUSED_FILES))
def test_hostile_upload_is_refused_with_a_stable_code(client: bentoml.SyncHTTPClient, tmp_path: Path,
                                                      name: str) -> None:
    make, code = REFUSED_FILES[name]
    path = tmp_path / name
    path.write_bytes(make())
    assert refusal(lambda: client.classify(image=path))[1] == code


@pytest.mark.parametrize("name", list(ACCEPTED_FILES))
def test_unusual_but_valid_images_are_classified_like_offline(client: bentoml.SyncHTTPClient, tmp_path: Path,
                                                              tiny_model: TinyModel, name: str) -> None:
    make, expected_class = ACCEPTED_FILES[name]
    data = make()
    path = tmp_path / name
    path.write_bytes(data)
    answer = client.classify(image=path)
    offline = OnnxClassifier.from_info(tiny_model.onnx_path, tiny_model.info)
    settings = ServiceConfig.from_env({"RC_MAX_PIXELS": "30000000"})  # the test server's decoder limit
    image = decode_image(data, settings.image_limits(), min_size=offline.info.preprocessing.resize_size)
    reference = offline.predict([image], settings.default_top_k, settings.uncertain_threshold)[0]
    assert answer["class"] == reference.label and answer["confidence"] == pytest.approx(reference.confidence, abs=1e-6)
    assert expected_class is None or answer["class"] == expected_class
    assert sum(p for _, p in answer["probabilities"]) == pytest.approx(1.0)


def test_each_image_of_a_batch_gets_its_own_result_or_error(client: bentoml.SyncHTTPClient, tmp_path: Path) -> None:
    names = ["bomb-8000x8000.png", "cmyk.jpg", "truncated.jpg", "animated.gif", "drawing.svg", "one-pixel.png"]
    paths = []
    for name in names:
        make = (REFUSED_FILES.get(name) or ACCEPTED_FILES[name])[0]
        paths.append(tmp_path / name)
        paths[-1].write_bytes(make())
    results = client.classify_batch(images=paths)["results"]
    outcome = [item["error"]["code"] if item["error"] else item["result"]["class"] for item in results]
    assert outcome == ["image_too_many_pixels", "bedroom", "corrupt_image", "bedroom", "not_an_image", "bathroom"]


# ---- hostile URLs ----------------------------------------------------------------------------------------


def hostile_urls(host: ImageHost) -> dict[str, str]:
    port = host.port
    good = "/img/red.jpg"
    host.add("page.jpg", b"<!doctype html><title>not an image</title>")
    host.add("bomb.png", png_bomb(8000, 8000))
    return {
        "file:///etc/passwd": "url_scheme_not_allowed",
        f"gopher://localhost:{port}/_GET%20/": "url_scheme_not_allowed",
        f"ftp://localhost:{port}/x.jpg": "url_scheme_not_allowed",
        "javascript:alert(1)": "url_scheme_not_allowed",
        f"http://127.0.0.1:{port}{good}": "url_host_not_allowed",
        f"http://0x7f000001:{port}{good}": "url_host_not_allowed",
        f"http://2130706433:{port}{good}": "url_host_not_allowed",
        f"http://0177.0.0.1:{port}{good}": "url_host_not_allowed",
        f"http://127.1:{port}{good}": "url_host_not_allowed",
        f"http://[::1]:{port}{good}": "url_host_not_allowed",
        f"http://[::ffff:127.0.0.1]:{port}{good}": "url_host_not_allowed",
        f"http://0.0.0.0:{port}{good}": "url_host_not_allowed",
        "http://169.254.169.254/latest/meta-data/": "url_host_not_allowed",
        "http://[fd00:ec2::254]/latest/meta-data/": "url_host_not_allowed",
        "http://10.0.0.1/x.jpg": "url_host_not_allowed",
        "http://192.168.0.1/x.jpg": "url_host_not_allowed",
        f"http://user:secret@localhost:{port}{good}": "invalid_url",
        "": "invalid_url",
        "http://": "invalid_url",
        host.url(f"/redirect?to=http://127.0.0.1:{port}{good}"): "url_host_not_allowed",
        host.url("/redirect?to=http://169.254.169.254/latest/meta-data/"): "url_host_not_allowed",
        host.url("/redirect?to=file:///etc/passwd"): "url_scheme_not_allowed",
        host.url("/hops/5"): "too_many_redirects",
        host.url("/slow"): "fetch_timeout",
        host.url("/stall"): "fetch_timeout",
        host.url("/endless"): "image_too_large",
        host.url("/huge-declared"): "image_too_large",
        host.url("/img/page.jpg"): "not_an_image",
        host.url("/img/bomb.png"): "image_too_many_pixels",
        host.url("/status/404"): "fetch_failed",
        host.url("/status/500"): "fetch_failed",
        "http://localhost:1/x.jpg": "fetch_failed",
    }


def test_hostile_urls_are_refused_with_stable_codes(client: bentoml.SyncHTTPClient, image_host: ImageHost) -> None:
    cases = hostile_urls(image_host)
    hits_before = image_host.hits.get("/img/red.jpg", 0)
    outcomes = {}
    for url in cases:
        started = time.monotonic()
        outcomes[url] = refusal(lambda url=url: client.classify(image_url=url))[1]
        assert time.monotonic() - started < 4.0, url  # the test server's total fetch timeout is 2 s
    assert outcomes == cases
    assert image_host.hits.get("/img/red.jpg", 0) == hits_before  # no refused URL reached the image


def test_allow_listed_host_works_through_redirects(client: bentoml.SyncHTTPClient, image_host: ImageHost) -> None:
    assert client.classify(image_url=image_host.url("/hops/2"))["class"] == "bedroom"
    assert client.classify(image_url=image_host.url("/img/red.jpg", host="LOCALHOST"))["class"] == "bedroom"
    assert client.classify(image_url=image_host.url("/img/red.jpg", host="localhost."))["class"] == "bedroom"


# ---- hostile request bodies ----------------------------------------------------------------------------


def test_file_field_given_a_url_is_not_fetched_by_bentoml(client: bentoml.SyncHTTPClient, server: BentoServer,
                                                          image_host: ImageHost) -> None:
    # BentoML's form parser downloads text values of file fields itself, bypassing every URL rule.
    # The generated client sends a URL string that way, so it can express this attack directly.
    before = image_host.hits.get("/img/red.jpg", 0)
    url = image_host.url("/img/red.jpg", host="127.0.0.1")
    assert refusal(lambda: client.classify_batch(images=[url])) == (400, "invalid_upload")
    assert refusal(lambda: client.classify(image=url)) == (400, "invalid_upload")
    response = requests.post(server.url + "/classify_batch", data={"images": url}, timeout=30)  # urlencoded
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_upload"
    assert image_host.hits.get("/img/red.jpg", 0) == before


def post(server: BentoServer, path: str = "/classify", **kwargs: Any) -> requests.Response:
    return requests.post(server.url + path, timeout=30, **kwargs)


def test_request_body_limits(server: BentoServer) -> None:
    too_big = b"x" * ((16 << 20) + 1)  # the test server's RC_MAX_REQUEST_BYTES is 16 MiB
    declared = post(server, data=too_big, headers={"Content-Type": "application/json"})
    streamed = post(server, data=iter([too_big[i:i + 65536] for i in range(0, len(too_big), 65536)]),
                    headers={"Content-Type": "application/json"})
    for response in (declared, streamed):
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_malformed_multipart_bodies(server: BentoServer) -> None:
    jpeg = solid_jpeg((255, 0, 0), (32, 32))
    cases = [
        {"files": {"image": ("a" * 240 + ".jpg", jpeg)}},  # would overflow BentoML's temp-file name
        {"files": {"image": ("nul\x00.jpg", jpeg)}},
        {"data": b"--xyz\r\nContent-Disposition: form-data\r\n\r\nno name\r\n--xyz--\r\n",
         "headers": {"Content-Type": "multipart/form-data; boundary=xyz"}},
        {"data": b"garbage", "headers": {"Content-Type": "multipart/form-data"}},  # no boundary
        {"data": b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\n" + jpeg,
         "headers": {"Content-Type": "multipart/form-data; boundary=b"}},  # never terminated
    ]
    for case in cases:
        response = post(server, **case)
        assert 400 <= response.status_code < 500, (case.get("headers"), response.status_code, response.text)
        assert response.json()["error"]["code"] in ("invalid_upload", "invalid_request", "missing_image")


def test_too_many_images(client: bentoml.SyncHTTPClient, tmp_path: Path) -> None:
    path = tmp_path / "red.jpg"
    path.write_bytes(solid_jpeg((255, 0, 0), (32, 32)))
    assert refusal(lambda: client.classify_batch(images=[path] * 17)) == (400, "too_many_images")
    assert refusal(lambda: client.classify_batch(images=[path] * 40)) == (400, "invalid_upload")
    assert refusal(lambda: client.classify_batch(image_urls=["http://10.0.0.1/x.jpg"] * 17)) == (400, "too_many_images")


def test_foreign_content_types_and_methods(server: BentoServer) -> None:
    pickle = post(server, data=b"\x80\x04K\x01.", headers={"Content-Type": "application/vnd.bentoml+pickle"})
    assert pickle.status_code == 415 and pickle.json()["error"]["code"] == "unsupported_media_type"
    xml = post(server, data=b"<image_url>x</image_url>", headers={"Content-Type": "application/xml"})
    assert xml.status_code == 400 and xml.json()["error"]["code"] == "invalid_request"
    put = requests.put(server.url + "/classify", json={"image_url": "x"}, timeout=30)
    assert put.status_code == 405 and put.json()["error"]["code"] == "method_not_allowed"


# ---- overload ------------------------------------------------------------------------------------------


def test_overload_is_shed_at_once_with_retry_after(server: BentoServer, image_host: ImageHost) -> None:
    limit = 24  # the test server's RC_MAX_CONCURRENCY; each slow URL holds a slot for the 2 s fetch timeout
    slow = {"image_url": image_host.url("/slow")}
    with ThreadPoolExecutor(max_workers=limit) as pool:
        holders = [pool.submit(post, server, json=slow) for _ in range(limit)]
        time.sleep(0.8)
        started = time.monotonic()
        shed = post(server, json={"image_url": image_host.url("/img/red.jpg")})
        shed_after = time.monotonic() - started
        health = requests.get(server.url + "/health", timeout=10)
        held = [future.result() for future in holders]
    assert shed.status_code == 429 and shed.json()["error"]["code"] == "overloaded", shed.text
    assert int(shed.headers["Retry-After"]) >= 1 and shed_after < 1.0
    assert health.status_code == 200  # health and probes are not counted against the limit
    assert [response.json()["error"]["code"] for response in held] == ["fetch_timeout"] * limit
    recovered = post(server, json={"image_url": image_host.url("/img/red.jpg")})
    assert recovered.status_code == 200 and recovered.json()["class"] == "bedroom"


def test_no_request_in_this_session_got_a_500(server: BentoServer) -> None:
    assert server.alive()
    log = server.log()
    assert "status=500" not in log and "status=502" not in log, [
        line for line in log.splitlines() if "status=50" in line][:5]
