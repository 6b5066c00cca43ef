"""explain=true through a real `bentoml serve` and BentoML's generated client: heatmaps that land on the right
pixels of the photo, the second class's map when uncertain, unchanged answers without explain, the OpenAPI
schema, and a clear error code from a model that cannot explain.

The explainable server runs the tiny model's variant with activation maps (testkit/tiny_model.py): its bedroom
map is a 7x7 grid of how red each 32x32 cell of the model's view is, so where the map is hot is known exactly.
The plain tiny model (conftest's `server`) has no feature map: the model without the output.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import bentoml
import numpy as np
import pytest
import requests
from PIL import Image

from inference.config import KernelConfig
from inference.preprocess import Preprocessing, bytes_to_pixels, bytes_to_pixels_and_view, crop_box
from testkit.images import encode, solid_jpeg
from testkit.model_home import TinyModel, register_tiny_model_in
from testkit.server import BentoServer, serve_model_home
from tests.test_service import error_of


@pytest.fixture(scope="module")
def explainable_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BentoServer, TinyModel]]:
    model = register_tiny_model_in(tmp_path_factory.mktemp("bentoml_home_explain"), explainable=True)
    with serve_model_home(model.home, tmp_path_factory.mktemp("logs") / "explain.log",
                          RC_MAX_CONCURRENCY="8", RC_MAX_QUEUED="0") as server:
        yield server, model


@pytest.fixture(scope="module")
def client(explainable_server: tuple[BentoServer, TinyModel]) -> Iterator[bentoml.SyncHTTPClient]:
    with explainable_server[0].client() as generated:
        yield generated


def marked_photo(size: tuple[int, int], cell: tuple[int, int], folder: Path) -> Path:
    """A dark red photo of `size` with a bright red square in the middle of map cell (row, col) of the model's
    view, placed by crop-box arithmetic in the photo's own pixels; saved as a JPEG (large ones are decoded at
    reduced scale by the service, so the box must be scaled back)."""
    left, top, right, bottom = crop_box(*size, Preprocessing())
    row, col = cell
    x = left + (col + 0.5) / 7 * (right - left)
    y = top + (row + 0.5) / 7 * (bottom - top)
    half = 0.25 / 7 * (right - left)  # half a cell wide: well inside the cell
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[..., 0] = 170
    pixels[round(y - half):round(y + half), round(x - half):round(x + half), 0] = 255
    path = folder / f"marked_{size[0]}x{size[1]}_{row}_{col}.jpg"
    path.write_bytes(encode(Image.fromarray(pixels), "JPEG", quality=95))
    return path


def hottest_cell(grid: list[list[float]]) -> tuple[int, int]:
    values = np.asarray(grid)
    return tuple(int(v) for v in np.unravel_index(values.argmax(), values.shape))


def test_crop_box_of_a_landscape_photo_is_the_central_square_in_its_pixels() -> None:
    """1600x1200: resized to 341x256, the crop starts at x=58, y=16 (round half to even), so in the photo's
    pixels the box is x 58*1600/341 .. 282*1600/341 and y 16*1200/256 .. 240*1200/256."""
    box = crop_box(1600, 1200, Preprocessing())
    assert box == pytest.approx((58 * 1600 / 341, 75.0, 282 * 1600 / 341, 1125.0))
    assert crop_box(1200, 1600, Preprocessing()) == pytest.approx((75.0, 58 * 1600 / 341, 1125.0, 282 * 1600 / 341))


@pytest.mark.parametrize("orientation", [1, 6])
@pytest.mark.parametrize("draft", [False, True])
def test_the_view_is_measured_on_the_photo_as_displayed_at_full_scale(orientation: int, draft: bool) -> None:
    """A 1600x1200 JPEG stored sideways (EXIF 6: shown as 1200x1600), decoded at 1/4 scale or full: the same
    pixels as `bytes_to_pixels`, and the crop box in the displayed photo's full-size pixels."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.new("RGB", (1600, 1200), (90, 120, 150)), "JPEG", exif=exif.tobytes(), quality=90)
    limits = KernelConfig.from_env({}).image_limits()
    pixels, view = bytes_to_pixels_and_view(data, Preprocessing(jpeg_draft=draft), limits)
    assert np.array_equal(pixels, bytes_to_pixels(data, Preprocessing(jpeg_draft=draft), limits))
    shown = (1600, 1200) if orientation == 1 else (1200, 1600)
    assert view.size == shown
    assert view.crop_box == pytest.approx(crop_box(*shown, Preprocessing()))


@pytest.mark.parametrize("size", [(640, 480), (1600, 1200), (700, 1000)])
@pytest.mark.parametrize("cell", [(1, 5), (6, 0), (3, 3)])
def test_a_known_pixel_lands_in_the_right_map_cell(client: bentoml.SyncHTTPClient, tmp_path: Path,
                                                    size: tuple[int, int], cell: tuple[int, int]) -> None:
    answer = client.classify(image=marked_photo(size, cell, tmp_path), explain=True)
    assert answer["class"] == "bedroom"  # the tiny model: red
    heatmap = answer["heatmap"]
    assert heatmap["image_size"] == list(size)
    assert heatmap["crop_box"] == pytest.approx(list(crop_box(*size, Preprocessing())), abs=0.05)
    [bedroom] = heatmap["maps"]
    assert bedroom["class"] == "bedroom" and len(bedroom["grid"]) == 7 and {len(r) for r in bedroom["grid"]} == {7}
    assert hottest_cell(bedroom["grid"]) == cell
    assert max(map(max, bedroom["grid"])) == 1.0 and min(map(min, bedroom["grid"])) >= 0.0


def test_uncertain_answers_explain_the_first_two_classes(client: bentoml.SyncHTTPClient, tmp_path: Path) -> None:
    photo = marked_photo((640, 480), (2, 2), tmp_path)
    answer = client.classify(image=photo, explain=True, threshold=1.0)
    assert answer["uncertain"] is True
    assert [m["class"] for m in answer["heatmap"]["maps"]] == [label for label, _ in answer["probabilities"][:2]]


def test_batch_explains_every_good_image_and_keeps_errors(client: bentoml.SyncHTTPClient, tmp_path: Path) -> None:
    photos = [marked_photo((640, 480), (0, 6), tmp_path), marked_photo((1600, 1200), (5, 1), tmp_path)]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    answer = client.classify_batch(images=[*photos, broken], explain=True)
    first, second, bad = answer["results"]
    assert hottest_cell(first["result"]["heatmap"]["maps"][0]["grid"]) == (0, 6)
    assert hottest_cell(second["result"]["heatmap"]["maps"][0]["grid"]) == (5, 1)
    assert bad["result"] is None and bad["error"]["code"] == "not_an_image"
    plain = client.classify_batch(images=photos)
    assert all("heatmap" not in item["result"] for item in plain["results"])


def test_without_explain_the_answer_is_byte_for_byte_the_same(explainable_server: tuple[BentoServer, TinyModel],
                                                              tmp_path: Path) -> None:
    url = explainable_server[0].url
    data = marked_photo((640, 480), (4, 4), tmp_path).read_bytes()
    default = requests.post(url + "/classify", files={"image": ("a.jpg", data)}, timeout=30)
    off = requests.post(url + "/classify", files={"image": ("a.jpg", data)}, data={"explain": "false"}, timeout=30)
    on = requests.post(url + "/classify", files={"image": ("a.jpg", data)}, data={"explain": "true"}, timeout=30)
    assert default.status_code == off.status_code == on.status_code == 200
    assert default.content == off.content and b"heatmap" not in default.content
    assert {key: value for key, value in on.json().items() if key != "heatmap"} == default.json()


def test_health_and_openapi_schema_describe_explain(explainable_server: tuple[BentoServer, TinyModel],
                                                     client: bentoml.SyncHTTPClient) -> None:
    health = client.request("GET", "/health").json()
    assert health["explain"] is True and health["model_info"]["explainable"] is True
    spec = requests.get(explainable_server[0].url + "/docs.json", timeout=10).json()
    text = json.dumps(spec)
    for name in ("Heatmap", "ClassHeatmap"):
        assert any(key.endswith(name) for key in spec["components"]["schemas"]), name
    assert "crop_box" in text and "explain_not_supported" in text


def test_a_model_without_maps_refuses_explain_with_a_clear_code(server: BentoServer) -> None:
    with server.client() as plain:
        assert plain.request("GET", "/health").json()["explain"] is False
        status, body = error_of(lambda: plain.classify(image_url="http://localhost/x.jpg", explain=True))
        assert status == 422 and body["error"]["code"] == "explain_not_supported"
        photo = solid_jpeg((255, 0, 0))
        response = requests.post(server.url + "/classify_batch", files={"images": ("a.jpg", photo)},
                                 data={"explain": "true"}, timeout=30)
        assert response.status_code == 422 and response.json()["error"]["code"] == "explain_not_supported"
        response = requests.post(server.url + "/classify", files={"image": ("a.jpg", photo)}, timeout=30)
        assert response.status_code == 200 and "heatmap" not in response.json()
