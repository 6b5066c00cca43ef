"""Class-activation maps as a second output of the exported ONNX graph (Zhou et al., 2016).

A network that ends in global average pooling and a linear layer computes `logit_c = mean_xy(F[:, x, y]) . W_c
+ b_c`, so `W_c . F[:, x, y]` says how much each cell of the last feature map F pushed class c: the map is one
1x1 convolution of F with the final layer's rows, a few hundred thousand multiply-adds next to the network's
300 million. `add_activation_maps` grafts that convolution onto an exported graph as the output
`activation_maps` [N, num_labels, h, w] (7x7 for a 224 input), reading F and W where the graph already has them:
the nodes that compute `logits` are left exactly as they were, so the logits stay the same bit for bit, and
ONNX Runtime computes the maps only when a caller asks for that output.

The INT8 file gets its maps after quantization (`training.quantize.quantize_int8` strips them, quantizes the plain
graph as before, and adds them back): the convolution reads the dequantized feature map and the dequantized
weights, so the map explains the quantized model's own logits. Torch-free: onnx and numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from inference.model import MAPS_OUTPUT_NAME, OUTPUT_NAME

POOLING_OPS = ("GlobalAveragePool", "ReduceMean")
# nodes between the pooling and the final layer that only reshape or (de)quantize the pooled vector
PASS_THROUGH_OPS = ("Reshape", "Flatten", "Squeeze", "Identity", "QuantizeLinear", "DequantizeLinear")
MAPS_NODE = "activation_maps_conv"
MAPS_WEIGHT = "activation_maps_weight"


class NoActivationMaps(ValueError):
    """The graph does not end in pooling + a linear layer, so it has no class-activation maps to give."""


@dataclass(frozen=True)
class FinalLayer:
    """Where the graph keeps what a class-activation map needs."""

    feature_map: str  # the tensor that is pooled: [N, C, h, w]
    weight: np.ndarray  # [num_labels, C], float32
    bias: np.ndarray  # [num_labels], float32 (zeros when the layer has none)


def has_activation_maps(model: onnx.ModelProto) -> bool:
    return any(output.name == MAPS_OUTPUT_NAME for output in model.graph.output)


def add_activation_maps(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with the output `activation_maps` added (a new model; the logits' nodes are untouched)."""
    if has_activation_maps(model):
        return model
    layer = find_final_layer(model)
    num_labels, channels = layer.weight.shape
    out = onnx.ModelProto()
    out.CopyFrom(model)
    weight = layer.weight.reshape(num_labels, channels, 1, 1).astype(np.float32)
    out.graph.initializer.append(numpy_helper.from_array(weight, MAPS_WEIGHT))
    out.graph.node.append(helper.make_node("Conv", [layer.feature_map, MAPS_WEIGHT], [MAPS_OUTPUT_NAME],
                                           name=MAPS_NODE, kernel_shape=[1, 1]))
    out.graph.output.append(helper.make_tensor_value_info(MAPS_OUTPUT_NAME, onnx.TensorProto.FLOAT,
                                                          ["N", num_labels, "h", "w"]))
    onnx.checker.check_model(out)
    return out


def remove_activation_maps(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` without the maps (what the quantizer sees: exactly the graph it quantized before maps existed)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep_nodes = [node for node in out.graph.node if node.name != MAPS_NODE]
    keep_inits = [init for init in out.graph.initializer if init.name != MAPS_WEIGHT]
    keep_outputs = [output for output in out.graph.output if output.name != MAPS_OUTPUT_NAME]
    for field, kept in ((out.graph.node, keep_nodes), (out.graph.initializer, keep_inits),
                        (out.graph.output, keep_outputs)):
        del field[:]
        field.extend(kept)
    return out


def add_activation_maps_to_file(path: Path) -> Path:
    """Rewrite the ONNX file at `path` with the maps output; raise NoActivationMaps if the graph has none."""
    onnx.save(add_activation_maps(onnx.load(str(path))), str(path))
    return path


def find_final_layer(model: onnx.ModelProto) -> FinalLayer:
    """Walk back from `logits`: a Gemm (or MatMul + Add), then reshapes/QDQ, then the pooling node."""
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    head = producers.get(OUTPUT_NAME)
    while head is not None and head.op_type in ("QuantizeLinear", "DequantizeLinear", "Identity"):
        head = producers.get(head.input[0])  # the INT8 graph quantizes the logits once more
    if head is None:
        raise NoActivationMaps(f"no node computes '{OUTPUT_NAME}'")
    if head.op_type == "Gemm":
        pooled, weight_name = head.input[0], head.input[1]
        transposed = any(a.name == "transB" and a.i == 1 for a in head.attribute)
        weight = constant_value(weight_name, producers, constants)
        weight = weight if transposed else weight.T
        bias = constant_value(head.input[2], producers, constants) if len(head.input) > 2 else None
    elif head.op_type == "Add" and head.input[0] in producers and producers[head.input[0]].op_type == "MatMul":
        matmul = producers[head.input[0]]
        pooled = matmul.input[0]
        weight = constant_value(matmul.input[1], producers, constants).T
        bias = constant_value(head.input[1], producers, constants)
    else:
        raise NoActivationMaps(f"'{OUTPUT_NAME}' comes from {head.op_type}, not a linear layer")
    feature_map = pooled_input(pooled, producers, constants)
    bias = np.zeros(weight.shape[0], np.float32) if bias is None else np.asarray(bias, np.float32).reshape(-1)
    return FinalLayer(feature_map=feature_map, weight=np.asarray(weight, np.float32), bias=bias)


def pooled_input(tensor: str, producers: dict[str, onnx.NodeProto], constants: dict[str, np.ndarray]) -> str:
    """The tensor a global average pooling reduced to `tensor` (through reshapes and Q/DQ pairs)."""
    node = producers.get(tensor)
    while node is not None and node.op_type in PASS_THROUGH_OPS:
        node = producers.get(node.input[0])
    if node is None or node.op_type not in POOLING_OPS:
        raise NoActivationMaps("the final layer's input is not a global average pooling of a feature map")
    if node.op_type == "ReduceMean" and not reduces_spatial_axes(node, producers, constants):
        raise NoActivationMaps("the final layer's input is a mean, but not over the spatial axes")
    if node.op_type == "GlobalAveragePool" and node.input[0] not in producers:
        raise NoActivationMaps("the pooling reads the image itself: there is no feature map to show")
    return node.input[0]


def reduces_spatial_axes(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto],
                         constants: dict[str, np.ndarray]) -> bool:
    axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)  # opset < 18
    if axes is None and len(node.input) > 1:
        axes = [int(v) for v in constant_value(node.input[1], producers, constants).reshape(-1)]
    return axes is not None and sorted(axes) in ([2, 3], [-2, -1])


def constant_value(name: str, producers: dict[str, onnx.NodeProto], constants: dict[str, np.ndarray]) -> np.ndarray:
    """An initializer's value, dequantized when it reaches the node through DequantizeLinear (INT8 weights)."""
    if name in constants:
        return constants[name].astype(np.float32)
    node = producers.get(name)
    if node is not None and node.op_type == "DequantizeLinear" and node.input[0] in constants:
        return dequantize(node, constants)
    if node is not None and node.op_type == "Constant":
        return numpy_helper.to_array(node.attribute[0].t).astype(np.float32)
    raise NoActivationMaps(f"the final layer's parameter '{name}' is not a constant")


def dequantize(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> np.ndarray:
    """numpy DequantizeLinear: (q - zero_point) * scale, per tensor or along `axis`."""
    quantized = constants[node.input[0]].astype(np.float32)
    scale = constants[node.input[1]].astype(np.float32)
    zero = constants[node.input[2]].astype(np.float32) if len(node.input) > 2 else np.zeros_like(scale)
    if scale.ndim == 0:
        return (quantized - zero) * scale
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % quantized.ndim
    shape = [1] * quantized.ndim
    shape[axis] = -1
    return (quantized - zero.reshape(shape)) * scale.reshape(shape)
