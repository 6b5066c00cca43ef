"""The served model as bytes + metadata, so it reaches workers on other machines without a shared file system.

The driver reads the ONNX file and its metadata from the BentoML model store (`read_model_bundle`) and puts
the bundle into Ray's object store once; every inference actor rebuilds the same `inference.model.
OnnxClassifier` from it (`load_classifier`), through the same `create_session` options the service uses.
Only the driver imports bentoml; workers need numpy, Pillow and onnxruntime (what the bento's image holds).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.model import ONNX_FILENAME, ModelInfo, OnnxClassifier


class ModelNotFound(LookupError):
    """The model tag is not in the BentoML model store of the driver."""


@dataclass(frozen=True)
class ModelBundle:
    """Everything an actor needs to serve the model: its store tag, the ONNX file's bytes, its metadata."""

    tag: str
    onnx_bytes: bytes
    metadata: dict[str, Any]

    @property
    def info(self) -> ModelInfo:
        return ModelInfo.from_metadata(self.tag, self.metadata)


def read_model_bundle(tag: str) -> ModelBundle:
    """Read `tag` (e.g. room_classifier:latest) from the current BENTOML_HOME; check its metadata."""
    import bentoml

    try:
        model = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound as exc:
        raise ModelNotFound(f"model {tag} is not in the BentoML model store ({exc}); train and register one "
                            "first, or name another with --model (`bentoml models list`)") from None
    bundle = ModelBundle(tag=str(model.tag), onnx_bytes=(Path(model.path) / ONNX_FILENAME).read_bytes(),
                         metadata=dict(model.info.metadata))
    bundle.info  # noqa: B018 - fails now, on the driver, with ModelLoadError if the metadata is unusable
    return bundle


def load_classifier(bundle: ModelBundle, intra_op_threads: int | None) -> OnnxClassifier:
    """An OnnxClassifier built exactly as the service builds it, from a private copy of the ONNX bytes.

    `OnnxClassifier.from_info` wants a path; ONNX Runtime has read the file once the session exists, so the
    temporary copy is deleted right away.
    """
    with tempfile.TemporaryDirectory(prefix="bulk-model-") as folder:
        path = Path(folder) / ONNX_FILENAME
        path.write_bytes(bundle.onnx_bytes)
        return OnnxClassifier.from_info(path, bundle.info, intra_op_threads=intra_op_threads)
