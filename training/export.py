"""Export the fine-tuned network to one self-contained ONNX file and check it against torch.

The file gets the class-activation maps as a second output where the network ends in pooling + a linear layer
(`training/activation_maps.py`; MobileNetV2 and ResNet do, MobileNetV3's two-layer head does not).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from inference.model import INPUT_NAME, OUTPUT_NAME
from training.activation_maps import NoActivationMaps, add_activation_maps

OPSET = 18


def export_onnx(model: nn.Module, path: Path, image_size: int, activation_maps: bool = True) -> Path:
    """Write `model` as a single ONNX file (weights inside, never a side `.onnx.data` file), dynamic batch;
    with `activation_maps`, add them as a second output where the network has them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    example = torch.randn(2, 3, image_size, image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=OPSET, dynamo=True, external_data=False,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    if activation_maps:
        try:
            onnx.save(add_activation_maps(proto), str(path))
        except NoActivationMaps as exc:
            print(f"exported without activation maps (explain=true will be refused): {exc}")
    side_files = list(path.parent.glob(path.name + ".data"))
    if side_files:
        raise RuntimeError(f"export wrote external data {side_files}; the model must be one file")
    return path


def max_logit_difference(model: nn.Module, onnx_path: Path, batch: np.ndarray) -> float:
    """Largest |torch - ONNX Runtime| logit over `batch`: proves the exported file computes the same thing."""
    with torch.no_grad():
        expected = model.cpu().eval()(torch.from_numpy(batch)).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    actual = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
    return float(np.abs(expected - actual).max())
