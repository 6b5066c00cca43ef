"""The exported classifier: ONNX Runtime session + the metadata that says how to use it.

`ModelContract` is how to run a model and read its outputs (labels in output order, preprocessing, softmax
temperature, architecture): training writes it into the model's metadata (`to_metadata`) and evaluates the
exported file with it, the service, bulk jobs and benchmarks read it back. `ModelInfo` is a stored model as the
service sees it: its contract, its tag, and whatever else training recorded (metrics, dataset fingerprint, ...).
`OnnxClassifier` runs the ONNX file and returns logits for a float32 [N, 3, H, W] batch (`logits`) or for uint8
pixels [N, H, W, 3] that it normalises itself (`logits_for_pixels`, what the service sends);
`predict(images, top_k, threshold)` chains preprocessing, logits and postprocessing for decoded images.
A model exported with class-activation maps (`training/activation_maps.py`) has a second output,
`activation_maps` [N, num_labels, h, w]; `can_explain` says so, and `logits_and_maps(_for_pixels)` fetch both
in one call. `logits` never asks ONNX Runtime for the maps, so a caller that does not want them does not pay.

Build it from files (training's evaluation of the exported model):
    OnnxClassifier.from_files("model.onnx", contract).logits(batch)
from a stored model's file and `ModelInfo` (bulk jobs' actors):
    OnnxClassifier.from_info("model.onnx", info)
or from a BentoML model-store entry (the service):
    OnnxClassifier.from_bento_model(bentoml.models.get("room_classifier:latest"))

Loading checks the file against the contract (input `input`, output `logits`, one logit per label) and
runs one warm-up batch, so a corrupt or mismatched model fails at load time with `ModelLoadError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import onnxruntime as ort
from PIL import Image

from inference.errors import ModelLoadError
from inference.postprocess import Prediction, postprocess
from inference.preprocess import Preprocessing, normalize_pixels, preprocess_batch

if TYPE_CHECKING:
    import bentoml

ONNX_FILENAME = "model.onnx"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MAPS_OUTPUT_NAME = "activation_maps"  # optional second output: per-class activation maps [N, labels, h, w]


@dataclass(frozen=True)
class ModelContract:
    """How to run a model and read its outputs, defined once: training evaluates the exported file with it and
    stores it (`to_metadata`), everyone who runs the model reads it back (`from_metadata`), so what was measured
    is what is served. Checked when built: a contract no one could serve is never made."""

    labels: tuple[str, ...]  # in the model's output order
    preprocessing: Preprocessing  # bytes -> model input, decoding included
    temperature: float  # softmax temperature fitted on validation data
    architecture: str

    def __post_init__(self) -> None:
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be at least two distinct names, got {list(self.labels)}")
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")

    def to_metadata(self) -> dict[str, Any]:
        """The contract's part of the model-store metadata (JSON-safe; the keys are `CONTRACT_KEYS`)."""
        return {"labels": list(self.labels), "preprocessing": self.preprocessing.to_dict(),
                "temperature": self.temperature, "architecture": self.architecture}

    @classmethod
    def from_metadata(cls, tag: str, metadata: Mapping[str, Any]) -> "ModelContract":
        """Read and check the contract in model `tag`'s metadata; raise ModelLoadError saying what is wrong."""
        try:
            labels = tuple(str(label) for label in metadata["labels"])
            preprocessing = Preprocessing.from_dict(metadata["preprocessing"])
            temperature = float(metadata["temperature"])
            architecture = str(metadata["architecture"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"model {tag}: metadata lacks or garbles {exc}") from None
        try:
            return ModelContract(labels, preprocessing, temperature, architecture)
        except ValueError as exc:
            raise ModelLoadError(f"model {tag}: {exc}") from None


CONTRACT_KEYS = tuple(item.name for item in fields(ModelContract))  # what `to_metadata` writes
CORE_KEYS = ("tag", *CONTRACT_KEYS)


@dataclass(frozen=True)
class ModelInfo(ModelContract):
    """A stored model as the service sees it: its contract, its store tag, and `extras`, whatever else training
    recorded (metrics, training config, dataset fingerprint, ...)."""

    tag: str
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_metadata(cls, tag: str, metadata: Mapping[str, Any]) -> "ModelInfo":
        """Validate the metadata the service relies on; raise ModelLoadError saying what is wrong."""
        extras = {key: value for key, value in metadata.items() if key not in CORE_KEYS}  # metrics, training, ...
        return cls.of(ModelContract.from_metadata(tag, metadata), tag, extras)

    @classmethod
    def of(cls, contract: ModelContract, tag: str, extras: Mapping[str, Any] | None = None) -> "ModelInfo":
        """`contract` under store tag `tag`, with `extras`."""
        return cls(**{name: getattr(contract, name) for name in CONTRACT_KEYS}, tag=tag, extras=dict(extras or {}))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description (what /health shows and what the API service receives)."""
        return {"tag": self.tag, **self.to_metadata(), **self.extras}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelInfo":
        return cls.from_metadata(str(data["tag"]), data)


class OnnxClassifier:
    """An ONNX Runtime session for the room classifier; `logits(batch)` is the whole inference."""

    def __init__(self, session: ort.InferenceSession, info: ModelInfo) -> None:
        self.session = session
        self.info = info
        check_signature(session, info)
        self.can_explain = any(node.name == MAPS_OUTPUT_NAME for node in session.get_outputs())
        warm_up(self)

    @classmethod
    def from_files(cls, onnx_path: str | Path, contract: ModelContract, tag: str = "local",
                   intra_op_threads: int | None = None) -> "OnnxClassifier":
        """The ONNX file run under `contract` (training's evaluation of its export, benchmarks, tests)."""
        return cls.from_info(onnx_path, ModelInfo.of(contract, tag), intra_op_threads)

    @classmethod
    def from_info(cls, onnx_path: str | Path, info: ModelInfo, intra_op_threads: int | None = None
                  ) -> "OnnxClassifier":
        """The ONNX file of the stored model `info` describes (its tag and extras kept, for /health)."""
        return cls(create_session(Path(onnx_path), intra_op_threads, info.tag), info)

    @classmethod
    def from_bento_model(cls, model: "bentoml.Model", intra_op_threads: int | None = None) -> "OnnxClassifier":
        info = ModelInfo.from_metadata(str(model.tag), model.info.metadata)
        return cls.from_info(Path(model.path) / ONNX_FILENAME, info, intra_op_threads)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N, 3, S, S] -> float32 [N, num_labels]."""
        if batch.shape[0] == 0:
            return np.zeros((0, len(self.info.labels)), dtype=np.float32)
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def logits_for_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] pixels (`inference.preprocess.bytes_to_pixels`) -> float32 [N, num_labels]."""
        return self.logits(normalize_pixels(pixels, self.info.preprocessing))

    def logits_and_maps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 [N, 3, S, S] -> (logits [N, num_labels], activation maps [N, num_labels, h, w]), one call.
        Only for a model that `can_explain` (callers check it and answer with an error code otherwise)."""
        if not self.can_explain:
            raise ValueError(f"model {self.info.tag} has no '{MAPS_OUTPUT_NAME}' output")
        feed = {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}
        logits, maps = self.session.run([OUTPUT_NAME, MAPS_OUTPUT_NAME], feed)
        return logits, maps

    def logits_and_maps_for_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, S, S, 3] pixels -> (logits, activation maps), as `logits_and_maps`."""
        return self.logits_and_maps(normalize_pixels(pixels, self.info.preprocessing))

    def predict(self, images: Sequence[Image.Image], top_k: int, threshold: float) -> list[Prediction]:
        """Decoded RGB images -> predictions, the same steps the service runs (offline reference); `top_k` and
        `threshold` as the service's settings (RC_DEFAULT_TOP_K, RC_UNCERTAIN_THRESHOLD) or a request say."""
        batch = preprocess_batch(images, self.info.preprocessing)
        return postprocess(self.logits(batch), self.info.labels, self.info.temperature, top_k, threshold)


def create_session(path: Path, intra_op_threads: int | None, tag: str) -> ort.InferenceSession:
    """CPU session with a fixed thread count (ORT's default, one thread per core, fights the decoders)."""
    if not path.is_file():
        raise ModelLoadError(f"model {tag}: {path} does not exist")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own types for unreadable/invalid graphs
        raise ModelLoadError(
            f"model {tag}: ONNX Runtime cannot load {path.name} ({type(exc).__name__}: {exc})") from None


def check_signature(session: ort.InferenceSession, info: ModelInfo) -> None:
    inputs = {node.name: node for node in session.get_inputs()}
    outputs = {node.name: node for node in session.get_outputs()}
    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        raise ModelLoadError(f"model {info.tag}: expected input '{INPUT_NAME}' and output '{OUTPUT_NAME}', "
                             f"found inputs {list(inputs)} and outputs {list(outputs)}")
    if len(inputs[INPUT_NAME].shape) != 4:
        raise ModelLoadError(f"model {info.tag}: input must be [N, 3, H, W], got {inputs[INPUT_NAME].shape}")


def warm_up(classifier: OnnxClassifier) -> None:
    """Run one batch of 2: fails on a broken graph and checks one logit per label."""
    size = classifier.info.preprocessing.image_size
    try:
        logits = classifier.logits(np.zeros((2, 3, size, size), dtype=np.float32))
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"model {classifier.info.tag}: a test batch fails ({type(exc).__name__}: {exc})") from None
    expected = (2, len(classifier.info.labels))
    if logits.shape != expected:
        raise ModelLoadError(f"model {classifier.info.tag}: output shape {list(logits.shape)} does not fit "
                             f"{len(classifier.info.labels)} labels (expected {list(expected)})")
    if classifier.can_explain:
        maps = classifier.logits_and_maps(np.zeros((2, 3, size, size), dtype=np.float32))[1]
        if maps.ndim != 4 or maps.shape[:2] != expected:
            raise ModelLoadError(f"model {classifier.info.tag}: '{MAPS_OUTPUT_NAME}' has shape {list(maps.shape)}, "
                                 f"expected [2, {len(classifier.info.labels)}, h, w]")
