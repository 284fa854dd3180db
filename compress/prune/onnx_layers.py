"""ONNX graphs of plain RepVGG layers as the export writes them, with random weights, for timing: one layer alone, or
a whole plain model at given widths.

FP32: Conv (+ bias) -> Relu. INT8: the QDQ form the INT8 export holds between two activations: DequantizeLinear of
the layer's quantized input (uint8 after a ReLU) and of its int8 per-channel weights (7-bit, as NNCF's overflow fix
leaves them), Conv with a float bias, Relu, QuantizeLinear to uint8. ONNX Runtime fuses that into one QLinearConv,
as it does in the real file. The first layer reads the float image through the export's signed input quantizer
(QuantizeLinear to int8), which it owns: ONNX Runtime turns that pair to uint8 on AVX2 CPUs before fusing, and could
not fuse a graph that started at an int8 input. `stem` names the rewrite of the first layer (compress.stem) the
export applies, so that what is timed is what is deployed.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compress.runtime import INPUT_NAME, MIN_OPSET, OUTPUT_NAME
from compress.stem import STEM_REWRITES
from repvgg import LayerSpec

_OPSET = [helper.make_opsetid("", MIN_OPSET)]


class _Graph:
    """Nodes and initializers of a graph being built, with unique names and seeded random weights."""

    def __init__(self, seed: int = 0):
        self.nodes, self.initializers, self.rng, self.count = [], [], np.random.default_rng(seed), 0

    def const(self, value: np.ndarray) -> str:
        self.count += 1
        name = f"c{self.count}"
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        self.count += 1
        out = f"t{self.count}"
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def conv_relu(self, x: str, spec: LayerSpec, weight: str) -> str:
        bias = self.const(self.rng.standard_normal(spec.out_channels).astype(np.float32))
        conv = self.node("Conv", [x, weight, bias], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         strides=[spec.stride] * 2, group=spec.groups)
        return self.node("Relu", [conv])

    def layer(self, x: str, spec: LayerSpec, int8: bool, first: bool) -> str:
        """One plain layer on `x` (a float image if `first`, else the previous layer's output, uint8 when `int8`);
        returns its output name."""
        shape = (spec.out_channels, spec.in_channels // spec.groups, 3, 3)
        if not int8:
            return self.conv_relu(x, spec, self.const(self.rng.standard_normal(shape).astype(np.float32) * 0.05))
        x_zero = np.uint8(0)
        if first:  # the input quantizer, signed as NNCF's on an image
            x_zero = np.int8(0)
            x = self.node("QuantizeLinear", [x, self.const(np.float32(0.02)), self.const(x_zero)])
        dq_x = self.node("DequantizeLinear", [x, self.const(np.float32(0.02)), self.const(x_zero)])
        weight = self.node(
            "DequantizeLinear",
            [self.const(self.rng.integers(-64, 64, shape, dtype=np.int8)),
             self.const(np.full(spec.out_channels, 0.01, np.float32)),
             self.const(np.zeros(spec.out_channels, np.int8))],
            axis=0,
        )
        y = self.conv_relu(dq_x, spec, weight)
        return self.node("QuantizeLinear", [y, self.const(np.float32(0.05)), self.const(np.uint8(0))])

    def model(self, inputs: list, outputs: list, x: str, y: str) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [y], [OUTPUT_NAME]))
        self.nodes.insert(0, helper.make_node("Identity", [INPUT_NAME], [x]))
        graph = helper.make_graph(self.nodes, "timing", inputs, outputs, self.initializers)
        return helper.make_model(graph, opset_imports=_OPSET, ir_version=helper.find_min_ir_version_for(_OPSET))


def layer_input_type(int8: bool, first: bool) -> np.dtype:
    """The element type a layer reads: float32 (FP32, or the image), else the quantized activation, uint8."""
    return np.dtype(np.uint8 if int8 and not first else np.float32)


def layer_model(spec: LayerSpec, size: int, int8: bool, first: bool, stem: str = "none") -> onnx.ModelProto:
    """One plain layer reading `spec.in_channels` x `size` x `size` (any batch); the first one rewritten as `stem`
    says."""
    g = _Graph()
    elem = helper.np_dtype_to_tensor_dtype(layer_input_type(int8, first))
    out_size = (size - 1) // spec.stride + 1
    y = g.layer("x", spec, int8, first)
    inputs = [helper.make_tensor_value_info(INPUT_NAME, elem, ["batch", spec.in_channels, size, size])]
    out_elem = TensorProto.UINT8 if int8 else TensorProto.FLOAT
    outputs = [helper.make_tensor_value_info(OUTPUT_NAME, out_elem, ["batch", spec.out_channels, out_size, out_size])]
    model = g.model(inputs, outputs, "x", y)
    return STEM_REWRITES[stem](model) if first else model


def plain_model(specs: list[LayerSpec], size: int, num_classes: int, int8: bool, stem: str = "none") -> onnx.ModelProto:
    """A whole plain model (layers, global average pool, linear head) reading 3-channel float images, its first
    layer rewritten as `stem` says."""
    g = _Graph()
    x = "x"
    for i, spec in enumerate(specs):
        x = g.layer(x, spec, int8, first=i == 0)
    if int8:
        x = g.node("DequantizeLinear", [x, g.const(np.float32(0.05)), g.const(np.uint8(0))])
    pooled = g.node("Flatten", [g.node("GlobalAveragePool", [x])])
    head = g.rng.standard_normal((num_classes, specs[-1].out_channels)).astype(np.float32)
    y = g.node("Gemm", [pooled, g.const(head), g.const(np.zeros(num_classes, np.float32))], transB=1)
    inputs = [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", specs[0].in_channels, size, size])]
    outputs = [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", num_classes])]
    return STEM_REWRITES[stem](g.model(inputs, outputs, "x", y))
