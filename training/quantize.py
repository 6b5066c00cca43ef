"""INT8 static quantization of the exported model with ONNX Runtime, calibrated on training images.

Activation ranges come from the 99.99th percentile of each tensor's calibration histogram, not its min/max:
one extreme activation no longer stretches the range and costs every other value its resolution. Chosen on
validation (docs/experiments.md, "INT8: calibration ranges"); the graph, and so the speed, is the same.

A file with class-activation maps is quantized without them and gets them back afterwards
(`training.activation_maps`), so the INT8 logits are those of the plain graph's INT8 file, bit for bit.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from training.activation_maps import add_activation_maps, has_activation_maps, remove_activation_maps

CALIBRATION_PERCENTILE = 99.99


class ArrayReader(CalibrationDataReader):
    """Feeds preprocessed calibration images to the quantizer in small batches. `__len__` and `set_range` let ONNX
    Runtime histogram one batch's activations and drop them before the next (`CalibStridedMinMax`, which strides
    the histogram calibrators too): all of them at once took more than 24 GB for the scene network at 224 px."""

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int = 16) -> None:
        self.batches = [{input_name: images[i:i + batch_size]} for i in range(0, len(images), batch_size)]
        self.set_range(0, len(self.batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.pending = iter(self.batches[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.pending, None)


def quantize_int8(fp32_path: Path, int8_path: Path, calibration_images: np.ndarray, input_name: str = "input") -> Path:
    """QDQ, per-channel int8 weights, uint8 activations with percentile ranges; shape inference first, as
    ONNX Runtime advises. Activation maps, if `fp32_path` has them, are added to the INT8 graph afterwards."""
    source = onnx.load(str(fp32_path))
    with tempfile.TemporaryDirectory() as tmp:
        plain, prepared = Path(tmp) / "plain.onnx", Path(tmp) / "prepared.onnx"
        onnx.save(remove_activation_maps(source), str(plain))
        quant_pre_process(str(plain), str(prepared))
        quantize_static(str(prepared), str(int8_path), ArrayReader(input_name, calibration_images),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.Percentile,
                        extra_options={"CalibPercentile": CALIBRATION_PERCENTILE, "CalibStridedMinMax": 1})
    if has_activation_maps(source):
        onnx.save(add_activation_maps(onnx.load(str(int8_path))), str(int8_path))
    return int8_path
