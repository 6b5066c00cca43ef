"""Save an exported ONNX model and its metadata into the BentoML model store.

Torch-free on purpose: tests of the service register tiny real models through the same code path.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import bentoml
import onnx

from inference.model import CONTRACT_KEYS, MAPS_OUTPUT_NAME, ONNX_FILENAME

MODEL_NAME = "room_classifier"
REQUIRED_METADATA = CONTRACT_KEYS  # `inference.model.ModelContract.to_metadata`; the tag is the store's own


def save_to_model_store(onnx_path: Path, metadata: dict[str, Any], name: str = MODEL_NAME) -> bentoml.Tag:
    """Copy `onnx_path` into a new model-store version of `name` with `metadata`; return its tag.

    The metadata must carry what the service needs to serve the file correctly, the model's contract
    (`ModelContract.to_metadata`: labels in output order, preprocessing, softmax temperature, architecture).
    `explainable` is added from the file itself: whether it has the class-activation maps output (what
    `explain=true` needs).
    """
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ValueError(f"model metadata lacks {missing}")
    metadata = {**metadata, "explainable": has_maps_output(onnx_path)}
    labels = {"task": "image-classification", "classes": "-".join(metadata["labels"]),
              "explainable": str(metadata["explainable"]).lower()}
    with bentoml.models.create(name, metadata=metadata, labels=labels) as model:
        shutil.copyfile(onnx_path, Path(model.path) / ONNX_FILENAME)
    return model.tag


def has_maps_output(onnx_path: Path) -> bool:
    """Whether the ONNX file has the `activation_maps` output (training/activation_maps.py); False for a file
    onnx cannot parse (the service refuses to load that one anyway, with its own message)."""
    try:
        outputs = onnx.load(str(onnx_path), load_external_data=False).graph.output
    except Exception:  # noqa: BLE001 - protobuf raises its own DecodeError types for a broken file
        return False
    return any(output.name == MAPS_OUTPUT_NAME for output in outputs)
