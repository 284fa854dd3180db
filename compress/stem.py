"""Exact rewrites of the first conv (the stem) of an exported ONNX file, FP32 or INT8 QDQ, for faster CPU kernels.

The stem reads the 3-channel image: its reduction dimension K (in_channels x 3 x 3 = 27) is a poor fit for INT8
GEMM kernels, which consume K in steps of 4-16 (VNNI) or 64 (AMX) and pad the rest with wasted work.

- `pad_channels(model, c)`: a `Pad` inserted before the stem widens its input to c zero channels and the weight
  gets c - 3 zero input channels: K = 27 -> 36/72/144 for c = 4/8/16. Exact: every added product is 0 x 0.
- `space_to_depth(model)`: a 3x3 stride-2 pad-1 conv on C channels equals a 2x2 stride-1 unpadded conv on the 4C
  channels of `SpaceToDepth(blocksize=2)` of the input padded by 1 (top/left) and 1 (bottom/right; 2 where that
  side is odd, so that the block grid covers it), the kernel zero-padded to 4x4 and its 2x2 blocks moved into
  channels: K = 2 x 2 x 12 = 48, and a stride-1 conv over a quarter of the pixels. Exact: each output sums the same
  products plus products with the zero 4th kernel row/column.
- `fp32_stem(model)`: an INT8 graph's stem run in FP32: it reads the float input (no QuantizeLinear /
  DequantizeLinear pair) and the dequantized INT8 kernel, so the kernel the file was trained and checked with; its
  output is quantized for the next conv as before. Not bit-exact: the input is no longer rounded to 8 bits, which
  only removes error.

All keep the file's contract (a 3-channel input 'input', dynamic batch) and metadata. Float rounding of the
reordered sums differs at the ulp level; INT8 accumulates the same integers. Whether a rewrite is faster depends
on the CPU and the runtime: apply one only where a measurement (benchmarks/graph_rewrites.py) says so; the caller
decides.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

PAD_CHANNELS = (4, 8, 16)
_QDQ = ("Identity", "QuantizeLinear", "DequantizeLinear")  # what may sit between the graph input and the stem
_REWRITTEN = ("Pad", "SpaceToDepth")  # ... and what a rewrite puts there
# (graph, the float tensor feeding the stem's chain) -> the nodes computing the stem's new input, their initializers
Ops = Callable[[onnx.GraphProto, str], tuple[list[onnx.NodeProto], list[onnx.TensorProto]]]
WeightFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (kernel, what stands for 0 in it) -> new kernel


def find_stem(model: onnx.ModelProto) -> onnx.NodeProto:
    """The Conv reading the graph input, through any Identity / QuantizeLinear / DequantizeLinear chain (and the
    Pad / SpaceToDepth of a rewritten stem)."""
    frontier = [model.graph.input[0].name]
    while frontier:
        tensor = frontier.pop()
        for node in model.graph.node:
            if node.input and node.input[0] == tensor:
                if node.op_type == "Conv":
                    return node
                if node.op_type in _QDQ + _REWRITTEN:
                    frontier.extend(node.output)
    raise ValueError("no Conv reads the graph input")


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    """The value of `node`'s attribute `name`, `default` where it has none."""
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """The node writing each tensor."""
    return {out: node for node in graph.node for out in node.output}


def _initializer(graph: onnx.GraphProto, name: str) -> onnx.TensorProto:
    """The initializer `name` reads, through Identity nodes."""
    producer = _producers(graph)
    while name in producer and producer[name].op_type == "Identity":
        name = producer[name].input[0]
    found = next((init for init in graph.initializer if init.name == name), None)
    if found is None:
        raise ValueError(f"stem rewrite: '{name}' is not an initializer")
    return found


def _drop_dead(graph: onnx.GraphProto) -> None:
    """Remove the nodes whose outputs nothing reads (and that are no graph output), then the unread initializers."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {t for n in graph.node for t in n.input} | outputs
        dead = [n for n in graph.node if not any(o in read for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    for init in [i for i in graph.initializer if i.name not in read]:
        graph.initializer.remove(init)


def _fresh(graph: onnx.GraphProto, base: str) -> str:
    """`base`, suffixed where a tensor of the graph already has that name."""
    used = {i.name for i in graph.initializer} | {t for n in graph.node for t in (*n.input, *n.output)}
    name, k = base, 1
    while name in used:
        name, k = f"{base}_{k}", k + 1
    return name


def _weight_reader(graph: onnx.GraphProto, conv: onnx.NodeProto) -> tuple[onnx.NodeProto, int]:
    """The node and input slot reading the stem's kernel: the conv (FP32) or the DequantizeLinear of an INT8 one."""
    dq = _producers(graph).get(conv.input[1])
    return (dq, 0) if dq is not None and dq.op_type == "DequantizeLinear" else (conv, 1)


def conv_kernel(graph: onnx.GraphProto, conv: onnx.NodeProto) -> onnx.TensorProto:
    """The initializer holding `conv`'s kernel: the FP32 one, or the INT8 one its DequantizeLinear reads (through
    Identity nodes); a ValueError where the kernel is computed."""
    reader, slot = _weight_reader(graph, conv)
    return _initializer(graph, reader.input[slot])


def _in_channels(graph: onnx.GraphProto, conv: onnx.NodeProto) -> int:
    """How many input channels the stem's kernel has."""
    return conv_kernel(graph, conv).dims[1]


def _input_chain(graph: onnx.GraphProto, conv: onnx.NodeProto, who: str) -> tuple[list[onnx.NodeProto], str]:
    """The nodes from the graph input to the stem `conv`, last first, and the graph input they start from; a
    ValueError (`who`: the message's prefix) where a rewrite's Pad or SpaceToDepth is among them."""
    producer = _producers(graph)
    chain, x = [], conv.input[0]
    while x in producer:
        chain.append(producer[x])
        x = chain[-1].input[0]
    if any(node.op_type in _REWRITTEN for node in chain):
        raise ValueError(f"{who}: the stem is already rewritten (a Pad or SpaceToDepth feeds it)")
    return chain, x


def _rewrite(model: onnx.ModelProto, tag: str, ops: Ops, weight_fn: WeightFn,
             conv_attrs: dict | None = None) -> onnx.ModelProto:
    """A copy of `model` whose stem reads `ops(graph, x)` of the float tensor feeding its activation chain (at the
    graph input, before any QuantizeLinear: see `pad_channels`) and whose weight is `weight_fn(w, fill)`, `w` the
    FP32 or INT8 kernel (O, C, kh, kw) and `fill` the value that stands for 0 in it ((O, 1, 1, 1)); `conv_attrs`
    replace the stem's attributes. `ops` returns its nodes and initializers."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    conv = find_stem(out)
    chain, x = _input_chain(graph, conv, "stem rewrite")
    first = chain[-1] if chain else conv
    reader, slot = _weight_reader(graph, conv)
    if reader is not conv:
        chain.append(reader)
    for node in chain:  # every tensor rewritten must feed only the stem
        if sum(node.output[0] in n.input for n in graph.node) != 1:
            raise ValueError(f"stem rewrite: '{node.output[0]}' also feeds nodes other than the stem")
    weight = _initializer(graph, reader.input[slot])
    w = numpy_helper.to_array(weight)
    fill = np.zeros((w.shape[0], 1, 1, 1), w.dtype)
    if reader is not conv and len(reader.input) > 2:  # INT8: a zero weight is the zero point
        fill = numpy_helper.to_array(_initializer(graph, reader.input[2])).reshape(-1, 1, 1, 1) + fill
    new_w = numpy_helper.from_array(np.ascontiguousarray(weight_fn(w, fill)), _fresh(graph, f"{weight.name}_{tag}"))
    nodes, inits = ops(graph, x)
    first.input[0] = nodes[-1].output[0]
    reader.input[slot] = new_w.name
    graph.initializer.extend([*inits, new_w])
    if not any(weight.name in n.input for n in graph.node):
        graph.initializer.remove(weight)
    for node in reversed(nodes):
        graph.node.insert(0, node)  # they read the graph input only: first in topological order
    if conv_attrs:
        del conv.attribute[:]
        conv.attribute.extend(helper.make_attribute(k, v) for k, v in conv_attrs.items())
    changed = {t for node in chain for t in node.output}  # their shapes changed: drop stale annotations
    kept = [v for v in graph.value_info if v.name not in changed]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    onnx.checker.check_model(out, full_check=True)
    return out


def _pad_node(graph: onnx.GraphProto, x: str, tag: str, pads: list[int]) -> tuple[onnx.NodeProto, onnx.TensorProto]:
    """A zero `Pad` of `x` by `pads` (ONNX order: every axis' begin, then every axis' end) and its pads tensor."""
    pads_init = numpy_helper.from_array(np.array(pads, np.int64), _fresh(graph, f"/stem/{tag}/pads"))
    node = helper.make_node("Pad", [x, pads_init.name], [_fresh(graph, f"/stem/{tag}/Pad_output_0")],
                            name=_fresh(graph, f"/stem/{tag}/Pad"), mode="constant")
    return node, pads_init


def pad_channels(model: onnx.ModelProto, channels: int) -> onnx.ModelProto:
    """`model` with its stem's input and weight padded to `channels` (one of PAD_CHANNELS) zero input channels.

    In an INT8 graph the Pad goes on the float input, before the stem's QuantizeLinear: 0 quantizes to the zero
    point, which dequantizes to exactly 0, and the Q -> DQ -> Conv chain stays as it was, the pattern ORT fuses
    into its INT8 QLinearConv. A Pad on the int8 tensor between Q and DQ splits that pair: ORT 1.31 then runs the
    stem as DequantizeLinear -> float Conv. The INT8 weight gets zero-point (0) input channels; its
    per-output-channel scales are unchanged."""
    if channels not in PAD_CHANNELS:
        raise ValueError(f"pad_channels: channels must be one of {PAD_CHANNELS}, got {channels}")
    conv = find_stem(model)
    c = _in_channels(model.graph, conv)
    if _attr(conv, "group", 1) != 1 or c >= channels:
        raise ValueError(f"pad_channels: the stem must be a group-1 conv on fewer than {channels} channels "
                         f"(it has {c} input channels, group {_attr(conv, 'group', 1)})")
    tag = f"pad{channels}"

    def ops(graph: onnx.GraphProto, x: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        node, pads = _pad_node(graph, x, tag, [0, 0, 0, 0, 0, channels - c, 0, 0])
        return [node], [pads]

    def weight(w: np.ndarray, fill: np.ndarray) -> np.ndarray:
        extra = np.broadcast_to(fill, (w.shape[0], channels - c, *w.shape[2:]))
        return np.concatenate([w, extra.astype(w.dtype)], axis=1)

    return _rewrite(model, tag, ops, weight)


def space_to_depth(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its 3x3 stride-2 pad-1 group-1 stem run as Pad -> SpaceToDepth(2) -> 2x2 stride-1 conv. The
    input's height and width must be static; an odd one is padded by 2 at its end (the output size stays
    ceil(H / 2), the extra row or column meeting only the zero 4th kernel row or column). In an INT8 graph, Pad
    and SpaceToDepth run on the float input before the stem's QuantizeLinear (as in `pad_channels`), so the conv
    keeps its Q/DQ and stays INT8."""
    conv = find_stem(model)
    shape = [_attr(conv, k, d) for k, d in
             (("kernel_shape", None), ("strides", [1, 1]), ("pads", [0] * 4), ("group", 1), ("dilations", [1, 1]))]
    if shape != [[3, 3], [2, 2], [1, 1, 1, 1], 1, [1, 1]]:
        raise ValueError(f"space_to_depth: the stem must be a 3x3 stride-2 pad-1 group-1 conv, got kernel "
                         f"{shape[0]} stride {shape[1]} pads {shape[2]} group {shape[3]} dilations {shape[4]}")
    h, w = (d.dim_value if d.HasField("dim_value") else None
            for d in model.graph.input[0].type.tensor_type.shape.dim[2:])
    if h is None or w is None:
        raise ValueError("space_to_depth: the input's height and width must be static")
    c = _in_channels(model.graph, conv)

    def ops(graph: onnx.GraphProto, x: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        pad, pads = _pad_node(graph, x, "s2d", [0, 0, 1, 1, 0, 0, 1 + h % 2, 1 + w % 2])
        s2d = helper.make_node("SpaceToDepth", [pad.output[0]], [_fresh(graph, "/stem/s2d/SpaceToDepth_output_0")],
                               name=_fresh(graph, "/stem/s2d/SpaceToDepth"), blocksize=2)
        return [pad, s2d], [pads]

    def weight(k: np.ndarray, fill: np.ndarray) -> np.ndarray:
        # ONNX SpaceToDepth is DCR: output channel (dy * 2 + dx) * C + c holds pixel (2i + dy, 2j + dx) of channel c,
        # so W2[o, (dy * 2 + dx) * C + c, ky, kx] = K4[o, c, 2 * ky + dy, 2 * kx + dx]
        k4 = np.broadcast_to(fill, (k.shape[0], c, 4, 4)).astype(k.dtype)
        k4[:, :, :3, :3] = k
        return k4.reshape(-1, c, 2, 2, 2, 2).transpose(0, 3, 5, 1, 2, 4).reshape(-1, 4 * c, 2, 2)

    return _rewrite(model, "s2d", ops, weight,
                    {"kernel_shape": [2, 2], "strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1], "group": 1})


def fp32_stem(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the INT8 QDQ `model` whose stem is a float conv: on the graph input directly, with the
    dequantized kernel (per output channel: (q - zero point) x scale). For runtimes where the 3-channel stem runs
    faster in FP32 than as an INT8 conv (see the module docstring)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    conv = find_stem(out)
    reader, _ = _weight_reader(graph, conv)
    if reader is conv:
        raise ValueError("fp32_stem: the stem's kernel is already float (not an INT8 QDQ graph)")
    if _attr(reader, "axis", 1) != 0 and len(_initializer(graph, reader.input[1]).dims) > 0:
        raise ValueError("fp32_stem: the stem's kernel scales are not per output channel (axis 0)")
    _, x = _input_chain(graph, conv, "fp32_stem")  # x: the float graph input, behind the stem's Q/DQ
    q = numpy_helper.to_array(_initializer(graph, reader.input[0])).astype(np.float32)
    scale = numpy_helper.to_array(_initializer(graph, reader.input[1])).astype(np.float32).reshape(-1, 1, 1, 1)
    zero = (numpy_helper.to_array(_initializer(graph, reader.input[2])).astype(np.float32).reshape(-1, 1, 1, 1)
            if len(reader.input) > 2 else np.zeros_like(scale))
    weight = numpy_helper.from_array((q - zero) * scale, _fresh(graph, f"{reader.input[0]}_fp32"))
    conv.input[0], conv.input[1] = x, weight.name
    graph.initializer.append(weight)
    _drop_dead(graph)  # the stem's input Q/DQ and weight DQ, unless something else reads them
    onnx.checker.check_model(out, full_check=True)
    return out


# export.stem's choices: name -> rewrite of a whole ONNX file ("none": the file as exported). `fp32` is for INT8
# files only; the others are exact in both precisions. A rewrite that does not fit the stem raises a ValueError.
STEM_REWRITES: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "none": lambda model: model,
    **{f"pad{c}": (lambda model, c=c: pad_channels(model, c)) for c in PAD_CHANNELS},
    "space_to_depth": space_to_depth,
    "fp32": fp32_stem,
}
FP32_STEM_REWRITES = tuple(name for name in STEM_REWRITES if name != "fp32")  # those an FP32 file can take


def rewrite_stem(path: str | Path, name: str) -> None:
    """Rewrite the ONNX file `path` with `STEM_REWRITES[name]` (a temp file renamed over it, as every file the
    pipeline writes); a ValueError (one line) where it does not fit the file's stem."""
    from compress.files import atomic_path  # torch-heavy: only when a file is rewritten

    rewritten = STEM_REWRITES[name](onnx.load(str(path)))
    with atomic_path(path) as tmp:
        onnx.save(rewritten, str(tmp))
