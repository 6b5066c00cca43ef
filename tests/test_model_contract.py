"""What was measured is what is served: the pixels a model sees are decided by its contract (its stored
preprocessing), never by a server setting. The same JPEG through the service and through a bulk job's load step,
with a model whose preprocessing says `jpeg_draft` false and one whose says true, gives the pixels that model's
contract says; and a deployment still setting the retired RC_JPEG_DRAFT is stopped at start-up, told why.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bulk.stages import LoadSettings, model_input_and_box, to_model_input
from inference.config import KernelConfig
from inference.model import ModelInfo, OnnxClassifier
from inference.postprocess import postprocess
from inference.preprocess import Preprocessing, bytes_to_pixels
from testkit.images import encode
from testkit.model_home import TinyModel, register_tiny_model_in
from testkit.server import REPO_ROOT, BentoServer, serve_model_home
from testkit.tiny_model import tiny_metadata


def striped_jpeg() -> bytes:
    """1600x1200, one-pixel stripes (red by column, green by row): decoded at 1/4 scale, its mean colour, all
    the tiny model looks at, differs from the full-scale decode's by far more than float noise."""
    y, x = np.mgrid[0:1200, 0:1600]
    pixels = np.stack([(x % 2) * 255, (y % 2) * 255, np.zeros_like(x)], axis=-1).astype(np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=90)


def info_with(jpeg_draft: bool) -> ModelInfo:
    return ModelInfo.from_metadata("room_classifier:test", tiny_metadata(jpeg_draft=jpeg_draft))


def test_a_bulk_jobs_pixels_follow_the_models_preprocessing_whatever_the_settings() -> None:
    data, config = striped_jpeg(), KernelConfig.from_env({"RC_MAX_PIXELS": "30000000", "RC_URL_FETCH": "false"})
    limits = config.image_limits()
    pixels = {}
    for draft in (True, False):
        settings = LoadSettings.from_config(config, info_with(draft), Path("."), explain=True)
        pixels[draft] = to_model_input(data, settings)
        assert np.array_equal(pixels[draft], bytes_to_pixels(data, Preprocessing(jpeg_draft=draft), limits))
        assert np.array_equal(model_input_and_box(data, settings)[0], pixels[draft])
    assert not np.array_equal(pixels[True], pixels[False])


@pytest.fixture(scope="module")
def full_scale_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """The tiny model, its preprocessing saying: decode large JPEGs at full scale."""
    return register_tiny_model_in(tmp_path_factory.mktemp("bentoml_home_full_scale"), jpeg_draft=False)


@pytest.fixture(scope="module")
def full_scale_server(full_scale_model: TinyModel,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[BentoServer]:
    with serve_model_home(full_scale_model.home, tmp_path_factory.mktemp("logs") / "full_scale.log",
                          RC_MAX_PIXELS="30000000", RC_MAX_CONCURRENCY="4", RC_MAX_QUEUED="0") as server:
        yield server


def offline_probabilities(model: TinyModel, data: bytes, jpeg_draft: bool) -> list[float]:
    """The tiny model's probabilities for `data` decoded as a model whose preprocessing says `jpeg_draft`."""
    classifier = OnnxClassifier.from_info(model.onnx_path, model.info)
    pixels = bytes_to_pixels(data, Preprocessing(jpeg_draft=jpeg_draft), KernelConfig().image_limits())
    prediction = postprocess(classifier.logits_for_pixels(pixels[None]), classifier.info.labels,
                             classifier.info.temperature, 4, 0.5)[0]
    return [probability for _, probability in sorted(prediction.probabilities)]


def test_the_service_decodes_as_the_served_models_preprocessing_says(full_scale_server: BentoServer,
                                                                   full_scale_model: TinyModel,
                                                                   tmp_path: Path) -> None:
    assert full_scale_model.info.preprocessing.jpeg_draft is False
    photo = tmp_path / "striped.jpg"
    photo.write_bytes(striped_jpeg())
    with full_scale_server.client() as client:
        answer = client.classify(image=photo)
    served = [probability for _, probability in sorted(answer["probabilities"])]
    full, draft = (offline_probabilities(full_scale_model, photo.read_bytes(), flag) for flag in (False, True))
    assert np.abs(np.subtract(full, draft)).max() > 1e-3  # the two decodes are told apart
    assert served == pytest.approx(full, abs=1e-6)


def test_rc_jpeg_draft_stops_the_service_at_start_up_saying_why(full_scale_model: TinyModel) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("RC_")}
    env.update(BENTOML_HOME=str(full_scale_model.home), BENTOML_DO_NOT_TRACK="true", RC_JPEG_DRAFT="true")
    result = subprocess.run([sys.executable, "-m", "bentoml", "serve", "service:RoomClassifier", "--host",
                             "127.0.0.1", "--port", "1"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "RC_JPEG_DRAFT='true'" in result.stderr and "part of the model's preprocessing" in result.stderr
