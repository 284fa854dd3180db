"""ONNX export: a model as an ONNX file of the contract `compress.runtime` runs (`compress.evaluation` runs it).

FP32 models are exported as they are. An NNCF-quantized model is first stripped to PyTorch-native fake-quantize
modules (`nncf.strip(..., strip_format=StripFormat.NATIVE)`), which the TorchScript exporter writes as
QuantizeLinear/DequantizeLinear pairs that ONNX Runtime fuses into INT8 kernels (NNCF's own export would emit
OpenVINO FakeQuantize ops ORT rejects). That graph still stores every weight in FP32 behind a QuantizeLinear;
`fold_weight_quantizers` computes those QuantizeLinear nodes once and stores the INT8 result, so the file holds
INT8 weights (about 4x smaller) and runs bit-identically.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from compress.files import atomic_path
from compress.quant import is_quantized, quiet_third_party_notices
from compress.runtime import INPUT_NAME, MIN_OPSET, OUTPUT_NAME


def _check_widths(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd) and (module.in_channels == 0 or module.out_channels == 0):
            raise ValueError(
                f"cannot export: layer '{name}' has zero width ({module.in_channels}->{module.out_channels} channels)"
            )
        if isinstance(module, nn.Linear) and (module.in_features == 0 or module.out_features == 0):
            raise ValueError(
                f"cannot export: layer '{name}' has zero width ({module.in_features}->{module.out_features} features)"
            )


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example_input: torch.Tensor,
    opset: int = MIN_OPSET,
    int8: bool = False,
    fold_weights: bool = True,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write `model` (a copy, in eval mode on CPU) as ONNX with input 'input', output 'logits' and a dynamic batch
    axis; check it with `onnx.checker` and return the path. `int8=True` (or an NNCF-quantized model) strips the
    NNCF quantizers to QuantizeLinear/DequantizeLinear first, and with `fold_weights` stores the weights as INT8
    (`fold_weight_quantizers`). `metadata` goes into the file's metadata_props (e.g. its provenance)."""
    if opset < MIN_OPSET:
        raise ValueError(f"export: opset must be >= {MIN_OPSET}, got {opset}")
    _check_widths(model)
    path = Path(path)
    example_input = example_input.detach().to("cpu", torch.float32)
    quantized = is_quantized(model)
    if int8 and not quantized:
        raise ValueError("export: int8=True needs a model quantized by compress.quant.quantize_model")
    model = copy.deepcopy(model).to("cpu").eval()
    if quantized:
        import nncf

        with quiet_third_party_notices():  # nncf.strip imports torchao
            model = nncf.strip(model, do_copy=False, strip_format=nncf.StripFormat.NATIVE, example_input=example_input)
        model.eval()
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript-exporter deprecation and tracer warnings
        torch.onnx.export(
            model,
            (example_input,),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )
        proto = onnx.load(str(tmp))
        if quantized and fold_weights:
            fold_weight_quantizers(proto)
        if metadata:
            onnx.helper.set_model_props(proto, metadata)
        if (quantized and fold_weights) or metadata:
            onnx.save(proto, str(tmp))
        onnx.checker.check_model(proto, full_check=True)
    return path


def _constants(graph) -> dict[str, np.ndarray]:
    """Every constant tensor of `graph` by name: initializers, Constant nodes, and Identity nodes over either."""
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:  # topological order: an Identity's input is resolved before it
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def _quantize_linear(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int) -> np.ndarray:
    """ONNX QuantizeLinear as ONNX Runtime computes it: float32 x / scale, round half to even, add the zero point,
    saturate to the zero point's integer type."""
    if scale.size > 1:  # per-channel along `axis`
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    info = np.iinfo(zero_point.dtype)
    q = np.rint(x.astype(np.float32) / scale.astype(np.float32)) + zero_point.astype(np.float32)
    return np.clip(q, info.min, info.max).astype(zero_point.dtype)


def fold_weight_quantizers(model) -> int:
    """Replace, in an onnx.ModelProto (in place), each QuantizeLinear whose inputs are all constants (a weight, its
    scales and zero points) by the integer tensor it computes, and drop the FP32 weights and nodes left unused.
    The DequantizeLinear after it then reads INT8 straight from the file, as ORT's own quantizer writes it.
    Returns how many QuantizeLinear nodes were folded."""
    graph = model.graph
    values = _constants(graph)
    folded, keep = [], []
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) == 3 and all(i in values for i in node.input):
            x, scale, zero_point = (values[i] for i in node.input)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            folded.append(numpy_helper.from_array(_quantize_linear(x, scale, zero_point, axis), node.output[0]))
        else:
            keep.append(node)
    graph.initializer.extend(folded)
    # drop what only fed the folded nodes: walk back from the outputs, keep what is reached
    needed = {o.name for o in graph.output}
    live = []
    for node in reversed(keep):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
    initializers = [init for init in graph.initializer if init.name in needed]
    del graph.node[:], graph.initializer[:]
    graph.node.extend(reversed(live))
    graph.initializer.extend(initializers)
    return len(folded)


def op_counts(path: str | Path) -> dict[str, int]:
    """How many nodes of each op type the ONNX graph holds (e.g. to see QuantizeLinear/DequantizeLinear)."""
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
