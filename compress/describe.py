"""`python compress.py inspect PATH`: what a checkpoint or ONNX file holds, without running a recipe."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
import torch_pruning as tp

from repvgg import PlainRepVGG

from .files import FORMAT, CheckpointError, build_model, load_checkpoint, load_model


def describe_torch(path: Path, image_size: int) -> list[str]:
    """A torch checkpoint's model: kind, layers, widths, MACs at `image_size`, params and precision."""
    record = load_checkpoint(path)
    int8 = isinstance(record, dict) and "quant_format" in record  # NNCF model: its FP32 architecture + quantizers
    if isinstance(record, dict) and "model" in record and "key" in record:
        return [f"{path}: training checkpoint of stage-internal state (epoch {record['epoch'] + 1}), not a model"]
    model = build_model(record) if isinstance(record, dict) and record.get("format") == FORMAT else load_model(path)
    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, 3, image_size, image_size))
    kind = "plain (inference-time)" if isinstance(model, PlainRepVGG) else "multi-branch (training-time)"
    if isinstance(model, PlainRepVGG):
        widths = model.widths()
        groups = [s.groups for s in model.layer_specs()]
    else:
        widths = [b.spec.out_channels for b in model.blocks()]
        groups = [b.spec.groups for b in model.blocks()]
    lines = [
        f"file: {path}",
        f"model: RepVGG, {kind}, {len(widths)} layers, {model.linear.out_features} classes",
        f"widths: {widths}",
        f"MACs: {macs / 1e6:.2f} M at {image_size}x{image_size}   params: {params / 1e6:.3f} M",
        f"precision: {'INT8 (NNCF fake-quant, QAT/PTQ)' if int8 else 'FP32'}",
    ]
    if any(g > 1 for g in groups):
        lines.insert(3, f"groups: {groups}")
    return lines


def describe_onnx(path: Path) -> list[str]:
    """An ONNX file's opset, inputs and outputs, conv widths, params, precision and op counts."""
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf raises its own types for damaged files
        raise CheckpointError(f"ONNX file {path} cannot be read: {e}") from None
    ops = Counter(node.op_type for node in model.graph.node)
    inits = {i.name: i for i in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}

    def weight(name: str):
        """The initializer behind a conv's weight input: QDQ graphs route it through (De)QuantizeLinear."""
        for _ in range(4):
            if name in inits:
                return inits[name]
            node = producers.get(name)
            if node is None or node.op_type not in ("DequantizeLinear", "QuantizeLinear", "Identity"):
                return None
            name = node.input[0]
        return None

    widths = [int(w.dims[0]) for node in model.graph.node if node.op_type == "Conv" and len(node.input) > 1
              for w in [weight(node.input[1])] if w is not None]
    params = sum(numpy_helper.to_array(i).size for i in model.graph.initializer)
    io = [f"{v.name}{[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]}" for v in model.graph.input]
    int8 = ops.get("QuantizeLinear", 0) > 0
    return [
        f"file: {path}",
        f"onnx: opset {max(o.version for o in model.opset_import)}, inputs {io}, outputs {[o.name for o in model.graph.output]}",
        f"conv layers: {len(widths)}   widths: {widths}",
        f"params: {params / 1e6:.3f} M",
        f"precision: {'INT8 (QuantizeLinear/DequantizeLinear)' if int8 else 'FP32'}",
        f"ops: {dict(sorted(ops.items()))}",
    ]


def describe(path: Path, image_size: int = 224) -> list[str]:
    """What the checkpoint or ONNX file `path` holds, as lines (`describe_onnx` for .onnx, else `describe_torch`
    with MACs at `image_size`); a missing or unreadable file is a CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such file: {path}")
    try:
        return describe_onnx(path) if path.suffix == ".onnx" else describe_torch(path, image_size)
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError) as e:  # a torch file whose record is not a model
        raise CheckpointError(f"{path}: {e}") from None
