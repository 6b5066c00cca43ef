"""A tiny but real ONNX room classifier for tests, and its registration in the BentoML model store.

The graph is GlobalAveragePool -> Flatten -> Gemm: four logits from the mean colour of the image, with
fixed weights chosen so that plain colours land on different classes after ImageNet normalisation:
red -> bedroom, green -> kitchen, blue -> bathroom, black -> living_room; with `--with-other` a fifth label,
`other` ("none of these rooms"), for white. It follows the serving
contract (input `input` float32 [N,3,224,224] with dynamic N, output `logits` [N,4] or [N,5], opset 17).

The explainable variant (`explainable=True`) pools the image to a 7x7 grid of 32x32-pixel cells first
(AveragePool -> GlobalAveragePool -> Flatten -> Gemm: the same logits) and gets the class-activation maps
output from `training.activation_maps`, as a real export does: its bedroom map is hot where the photo is red.
The plain one has no feature map, so it is the model that cannot explain.

`register_tiny_model()` saves it into whatever BENTOML_HOME the current process uses, through the same
`training.register.save_to_model_store` that real training uses. From a shell:

    BENTOML_HOME=/tmp/bm python -m testkit.tiny_model          # prints the tag
    BENTOML_HOME=/tmp/bm python -m testkit.tiny_model --json   # tag, model directory and metadata
    BENTOML_HOME=/tmp/bm python -m testkit.tiny_model --explainable
    BENTOML_HOME=/tmp/bm python -m testkit.tiny_model --no-jpeg-draft   # large JPEGs decoded at full scale
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from data_prep.common import CLASSES, OTHER
from inference.model import ModelContract
from inference.preprocess import Preprocessing

TINY_LABELS = list(CLASSES)
TINY_TEMPERATURE = 1.5
IMAGE_SIZE = 224
# rows: one per label, columns: mean of the normalised R, G, B channels
TINY_WEIGHTS = np.array([[-1.0, -1.0, 2.0],   # bathroom: blue
                         [2.0, -1.0, -1.0],   # bedroom: red
                         [-1.0, 2.0, -1.0],   # kitchen: green
                         [-1.0, -1.0, -1.0]],  # living_room: dark
                        dtype=np.float32)
TINY_BIAS = np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32)
OTHER_WEIGHTS = np.array([[1.0, 1.0, 1.0]], dtype=np.float32)  # other: white (bright in every channel)
OTHER_BIAS = np.array([0.0], dtype=np.float32)


def tiny_labels(with_other: bool = False) -> list[str]:
    return TINY_LABELS + ([OTHER] if with_other else [])


GRID_CELL = 32  # the explainable variant's feature map: 224 / 32 = 7x7 cells, like MobileNetV2's


def build_tiny_onnx(path: Path, with_other: bool = False, explainable: bool = False) -> Path:
    """Write the tiny classifier to `path` and return it."""
    weights = np.concatenate([TINY_WEIGHTS, OTHER_WEIGHTS]) if with_other else TINY_WEIGHTS
    bias = np.concatenate([TINY_BIAS, OTHER_BIAS]) if with_other else TINY_BIAS
    cells = [helper.make_node("AveragePool", ["input"], ["cells"], kernel_shape=[GRID_CELL, GRID_CELL],
                              strides=[GRID_CELL, GRID_CELL])]
    graph = helper.make_graph(
        nodes=[
            *(cells if explainable else []),
            helper.make_node("GlobalAveragePool", ["cells" if explainable else "input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
            helper.make_node("Gemm", ["features", "weight", "bias"], ["logits"], transB=1),
        ],
        name="tiny_room_classifier",
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, IMAGE_SIZE, IMAGE_SIZE])],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(weights)])],
        initializer=[numpy_helper.from_array(weights, "weight"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="testkit.tiny_model")
    model.ir_version = 8
    onnx.checker.check_model(model)
    if explainable:
        from training.activation_maps import add_activation_maps

        model = add_activation_maps(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def tiny_contract(with_other: bool = False, jpeg_draft: bool = True) -> ModelContract:
    """The tiny model's contract, as training builds a real one."""
    return ModelContract(labels=tuple(tiny_labels(with_other)),
                         preprocessing=Preprocessing(image_size=IMAGE_SIZE, jpeg_draft=jpeg_draft),
                         temperature=TINY_TEMPERATURE, architecture="tiny_gap_gemm")


def tiny_metadata(with_other: bool = False, jpeg_draft: bool = True) -> dict[str, Any]:
    """Metadata shaped like real training's (the contract, then what training records), so the service reads
    it the same way."""
    return {
        **tiny_contract(with_other, jpeg_draft).to_metadata(),
        "metrics": {"note": "untrained test model: fixed weights, mean colour only"},
        "dataset_fingerprint": "none",
    }


def register_tiny_model(with_other: bool = False, explainable: bool = False,
                        jpeg_draft: bool = True):  # -> bentoml.Tag
    """Save the tiny model as `room_classifier` in the current BentoML home; return its tag."""
    from training.register import save_to_model_store  # imports bentoml: keep it out of module import

    with tempfile.TemporaryDirectory() as workdir:
        onnx_path = build_tiny_onnx(Path(workdir) / "model.onnx", with_other, explainable)
        return save_to_model_store(onnx_path, tiny_metadata(with_other, jpeg_draft))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print tag, model directory and metadata as JSON")
    parser.add_argument("--with-other", action="store_true", help=f"a fifth label, {OTHER!r}, for white images")
    parser.add_argument("--explainable", action="store_true", help="the variant with activation maps")
    parser.add_argument("--no-jpeg-draft", action="store_true",
                        help="preprocessing that decodes large JPEGs at full scale (jpeg_draft false)")
    args = parser.parse_args()
    tag = register_tiny_model(args.with_other, args.explainable, jpeg_draft=not args.no_jpeg_draft)
    if not args.json:
        print(tag)
        return
    import bentoml

    model = bentoml.models.get(tag)
    print(json.dumps({"tag": str(tag), "path": str(model.path), "metadata": model.info.metadata}))


if __name__ == "__main__":
    main()
