"""OnnxClassifier, ModelInfo, softmax/postprocess and the RC_* configuration (no server)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference.errors import ModelLoadError
from inference.model import CONTRACT_KEYS, ModelContract, ModelInfo, OnnxClassifier
from inference.postprocess import postprocess, softmax
from inference.preprocess import Preprocessing, preprocess_batch
from serving.config import ServiceConfig
from testkit.tiny_model import TINY_BIAS, TINY_LABELS, TINY_WEIGHTS, build_tiny_onnx, tiny_contract, tiny_metadata


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_onnx(tmp_path_factory.mktemp("tiny") / "model.onnx")


def test_onnx_logits_match_the_graph_computed_by_hand(tiny_onnx: Path) -> None:
    classifier = OnnxClassifier.from_files(tiny_onnx, tiny_contract(), intra_op_threads=1)
    batch = np.random.default_rng(0).normal(size=(5, 3, 224, 224)).astype(np.float32)
    expected = batch.mean(axis=(2, 3)) @ TINY_WEIGHTS.T + TINY_BIAS
    np.testing.assert_allclose(classifier.logits(batch), expected, rtol=1e-4, atol=1e-4)
    assert classifier.logits(batch[:0]).shape == (0, 4)


def test_plain_colours_land_on_different_classes(tiny_onnx: Path) -> None:
    classifier = OnnxClassifier.from_files(tiny_onnx, tiny_contract())
    colours = {"bedroom": (255, 0, 0), "kitchen": (0, 255, 0), "bathroom": (0, 0, 255), "living_room": (0, 0, 0)}
    defaults = ServiceConfig()
    predictions = classifier.predict([Image.new("RGB", (300, 200), colour) for colour in colours.values()],
                                     defaults.default_top_k, defaults.uncertain_threshold)
    assert [p.label for p in predictions] == list(colours)


def test_corrupt_or_missing_model_files_fail_at_load(tmp_path: Path, tiny_onnx: Path) -> None:
    garbage = tmp_path / "model.onnx"
    garbage.write_bytes(b"\x08\x07this is not a protobuf" * 50)
    with pytest.raises(ModelLoadError, match="cannot load"):
        OnnxClassifier.from_files(garbage, tiny_contract())
    with pytest.raises(ModelLoadError, match="does not exist"):
        OnnxClassifier.from_files(tmp_path / "missing.onnx", tiny_contract())
    half = tmp_path / "half.onnx"
    half.write_bytes(tiny_onnx.read_bytes()[:200])
    with pytest.raises(ModelLoadError):
        OnnxClassifier.from_files(half, tiny_contract())


def test_metadata_that_does_not_fit_the_model_fails_at_load(tiny_onnx: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not fit 3 labels"):
        OnnxClassifier.from_files(tiny_onnx, replace(tiny_contract(), labels=("a", "b", "c")))
    for broken in ({"labels": ["a", "a", "b", "c"]}, {"temperature": 0}, {"temperature": "warm"},
                   {"preprocessing": {"image_size": 224}}):
        with pytest.raises(ModelLoadError):
            ModelInfo.from_metadata("t", {**tiny_metadata(), **broken})
    metadata = tiny_metadata()
    del metadata["architecture"]
    with pytest.raises(ModelLoadError, match="architecture"):
        ModelInfo.from_metadata("t", metadata)


def test_model_info_round_trips_through_json_shape() -> None:
    info = ModelInfo.from_metadata("room_classifier:v1", tiny_metadata())
    again = ModelInfo.from_dict(info.to_dict())
    assert again == info and again.preprocessing == Preprocessing(image_size=224)
    assert info.to_dict()["metrics"] == tiny_metadata()["metrics"]


def test_the_contract_is_written_and_read_back_as_one_typed_object() -> None:
    """What training writes (`to_metadata`) is the contract's part of a stored model's metadata, and reading a
    stored model gives the same contract back (a ModelInfo is that contract plus tag and extras)."""
    stored = tiny_metadata()
    contract = tiny_contract()
    assert contract.to_metadata() == {key: stored[key] for key in CONTRACT_KEYS}
    info = ModelInfo.from_metadata("room_classifier:v1", stored)
    assert ModelContract.from_metadata("room_classifier:v1", stored) == contract
    assert info.to_metadata() == contract.to_metadata() and info.to_dict() == {"tag": "room_classifier:v1", **stored}
    with pytest.raises(ValueError, match="at least two distinct names"):
        replace(contract, labels=("bedroom", "bedroom"))
    with pytest.raises(ValueError, match="positive number"):
        replace(contract, temperature=0.0)


def test_softmax_is_temperature_scaled_and_sums_to_one() -> None:
    logits = np.array([[2.0, 1.0, 0.0, -1.0], [1000.0, 0.0, -1000.0, 5.0]])
    probabilities = softmax(logits, temperature=2.0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(probabilities[0], softmax(logits[:1] / 2.0)[0])
    assert np.isfinite(probabilities).all()
    with pytest.raises(ValueError):
        softmax(logits, temperature=0)


def test_postprocess_sorts_clamps_top_k_and_flags_uncertainty() -> None:
    logits = np.array([[0.0, 3.0, 1.0, 0.5], [1.0, 1.0, 1.0, 1.0]])
    sure, flat = postprocess(logits, TINY_LABELS, 1.0, top_k=2, threshold=0.5)
    assert sure.label == "bedroom" and not sure.uncertain
    assert [label for label, _ in sure.probabilities] == ["bedroom", "kitchen", "living_room", "bathroom"]
    assert sure.top_k == sure.probabilities[:2] and sure.confidence == sure.probabilities[0][1]
    assert abs(sum(p for _, p in sure.probabilities) - 1.0) < 1e-12
    assert flat.uncertain and flat.confidence == pytest.approx(0.25)
    assert len(postprocess(logits, TINY_LABELS, 1.0, top_k=99, threshold=0.5)[0].top_k) == 4
    with pytest.raises(ValueError):
        postprocess(logits[:, :3], TINY_LABELS, 1.0, top_k=1, threshold=0.5)


def test_preprocess_output_feeds_the_model(tiny_onnx: Path) -> None:
    batch = preprocess_batch([Image.new("RGB", (640, 480)), Image.new("RGB", (1, 1))], Preprocessing())
    assert batch.shape == (2, 3, 224, 224) and batch.dtype == np.float32
    assert OnnxClassifier.from_files(tiny_onnx, tiny_contract()).logits(batch).shape == (2, 4)


def test_config_defaults_and_environment() -> None:
    default = ServiceConfig.from_env({})
    assert default.model_tag == "room_classifier:latest" and default.url_allowlist == ()
    config = ServiceConfig.from_env({"RC_MAX_BATCH_SIZE": "8", "RC_URL_ALLOWLIST": "localhost, 10.0.0.0/8,",
                                     "RC_URL_FETCH": "off", "RC_UNCERTAIN_THRESHOLD": "0.7",
                                     "RC_MAX_PIXELS": "1_000_000", "UNRELATED": "x"})
    assert (config.max_batch_size, config.url_allowlist, config.url_fetch, config.uncertain_threshold,
            config.max_pixels) == (8, ("localhost", "10.0.0.0/8"), False, 0.7, 1_000_000)


@pytest.mark.parametrize("env", [{"RC_MAX_BATCH_SIZE": "many"}, {"RC_WORKERS": "0"}, {"RC_URL_FETCH": "maybe"},
                                 {"RC_UNCERTAIN_THRESHOLD": "1.5"}, {"RC_IMAGE_FORMATS": ","}])
def test_bad_config_names_the_variable(env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="RC_"):
        ServiceConfig.from_env(env)


def test_image_formats_must_be_names_pillow_knows() -> None:
    assert ServiceConfig.from_env({"RC_IMAGE_FORMATS": "jpeg, PNG"}).image_formats == ("jpeg", "PNG")
    with pytest.raises(ValueError, match=r"RC_IMAGE_FORMATS.*'JPG'"):  # JPG would refuse every image
        ServiceConfig.from_env({"RC_IMAGE_FORMATS": "JPEG,JPG"})
