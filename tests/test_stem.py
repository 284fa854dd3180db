"""Exact rewrites of the stem conv of exported ONNX files (compress.stem), FP32 and INT8 QDQ, run on ORT CPU."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from compress.export import export_onnx
from compress.quant import quantize_model, use_reference_kernels
from compress.stem import PAD_CHANNELS, STEM_REWRITES, find_stem, fp32_stem, pad_channels, space_to_depth
from repvgg import LayerSpec, PlainRepVGG

use_reference_kernels()  # no NNCF extension build

META = {"repvgg_compress.recipe": "tiny-stem"}
REWRITES = {name: rewrite for name, rewrite in STEM_REWRITES.items() if name not in ("none", "fp32")}  # the exact ones


def tiny(stride: int) -> PlainRepVGG:
    torch.manual_seed(stride)
    return PlainRepVGG([LayerSpec(3, 8, stride), LayerSpec(8, 16, 2), LayerSpec(16, 16, 1)], num_classes=10).eval()


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """ONNX models by (kind, stem stride, input size): FP32 at even and odd sizes, INT8 (NNCF PTQ) at 16x16."""
    out = tmp_path_factory.mktemp("stem")
    models = {}
    for stride, size in ((2, 16), (1, 16), (2, 15)):
        net, example = tiny(stride), torch.zeros(1, 3, size, size)
        models["fp32", stride, size] = onnx.load(str(export_onnx(net, out / f"f{stride}_{size}.onnx", example,
                                                                 metadata=META)))
        if size == 16:
            q = quantize_model(net, [torch.randn(8, 3, size, size)], example, calibration_size=8)
            path = export_onnx(q, out / f"q{stride}.onnx", example, int8=True, metadata=META)
            models["int8", stride, size] = onnx.load(str(path))
    return models


def run(model: onnx.ModelProto, x: np.ndarray, optimized: str | None = None) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3  # no warning about the saved optimized graph being machine-specific
    if optimized:
        opts.optimized_model_filepath = optimized
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def cases(kind: str):
    return [(key, name) for key in ((kind, 2, 16), (kind, 1, 16), (kind, 2, 15)) if kind == "fp32" or key[2] == 16
            for name in REWRITES if name != "space_to_depth" or key[1] == 2]


def inputs(size: int):
    rng = np.random.default_rng(size)
    return [rng.standard_normal((b, 3, size, size)).astype(np.float32) for b in (2, 3)]


def stem_weight(model: onnx.ModelProto) -> onnx.TensorProto:
    """The stem's FP32 or INT8 kernel initializer."""
    producer = {o: n for n in model.graph.node for o in n.output}
    name = find_stem(model).input[1]
    if name in producer:
        name = producer[name].input[0]  # behind its DequantizeLinear
    return next(i for i in model.graph.initializer if i.name == name)


def check_contract(original: onnx.ModelProto, rewritten: onnx.ModelProto) -> None:
    dims = rewritten.graph.input[0].type.tensor_type.shape.dim
    assert [i.name for i in rewritten.graph.input] == ["input"] and [o.name for o in rewritten.graph.output] == ["logits"]
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [d.dim_value for d in original.graph.input[0]
                                                                    .type.tensor_type.shape.dim[1:]]
    assert {p.key: p.value for p in rewritten.metadata_props} == META
    # the stem's output shape is unchanged (odd sizes included)
    shapes = []
    for m in (original, rewritten):
        inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
        info = {v.name: v for v in inferred.graph.value_info}
        shapes.append([d.dim_value or d.dim_param for d in info[find_stem(m).output[0]].type.tensor_type.shape.dim])
    assert shapes[0] == shapes[1], shapes


def test_find_stem_walks_through_the_input_quantizer(graphs):
    for key, model in graphs.items():
        stem = find_stem(model)
        assert stem.op_type == "Conv" and stem.name == "/layers.0/conv/Conv", key
    producer = {o: n.op_type for n in graphs["int8", 2, 16].graph.node for o in n.output}
    assert producer[find_stem(graphs["int8", 2, 16]).input[0]] == "DequantizeLinear"


@pytest.mark.parametrize("key,name", cases("fp32"), ids=lambda v: "_".join(map(str, v)) if isinstance(v, tuple) else v)
def test_fp32_rewrites_are_exact(graphs, key, name):
    original = graphs[key]
    before = original.SerializeToString()
    rewritten = REWRITES[name](original)
    assert original.SerializeToString() == before  # a new model; the original is left alone
    check_contract(original, rewritten)
    for x in inputs(key[2]):
        ref, got = run(original, x), run(rewritten, x)
        assert got.shape == ref.shape == (x.shape[0], 10)
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()  # the same sums, in another order


@pytest.mark.parametrize("key,name", cases("int8"), ids=lambda v: "_".join(map(str, v)) if isinstance(v, tuple) else v)
def test_int8_rewrites_are_exact_and_stay_int8(graphs, key, name, tmp_path):
    original = graphs[key]
    rewritten = REWRITES[name](original)
    check_contract(original, rewritten)
    # the conv still reads Q -> DQ activations and an INT8 weight behind its DequantizeLinear, with the same scales
    producer = {o: n for n in rewritten.graph.node for o in n.output}
    stem, old_stem = find_stem(rewritten), find_stem(original)
    act_dq, w_dq = producer[stem.input[0]], producer[stem.input[1]]
    assert act_dq.op_type == "DequantizeLinear" and producer[act_dq.input[0]].op_type == "QuantizeLinear"
    old_w_dq = {o: n for n in original.graph.node for o in n.output}[old_stem.input[1]]
    assert w_dq.op_type == "DequantizeLinear" and list(w_dq.input[1:]) == list(old_w_dq.input[1:])
    assert stem_weight(rewritten).data_type == onnx.TensorProto.INT8
    for x in inputs(key[2]):
        ref = run(original, x)
        got = run(rewritten, x, optimized=str(tmp_path / "optimized.onnx"))
        # the same integers summed, the same requantization: equal up to float noise (bit-identical here)
        assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max()
    # ORT fuses the rewritten stem into its INT8 conv, as it does the original one
    fused = onnx.load(str(tmp_path / "optimized.onnx")).graph.node
    assert any(n.op_type == "QLinearConv" and n.input[3] == stem_weight(rewritten).name for n in fused)


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_channel_padding_reaches_the_stated_k(graphs, kind):
    original = graphs[kind, 2, 16]
    w0 = numpy_helper.to_array(stem_weight(original))
    assert w0.shape[1:] == (3, 3, 3)  # K = 27
    for c in PAD_CHANNELS:
        w = numpy_helper.to_array(stem_weight(pad_channels(original, c)))
        assert w.shape == (w0.shape[0], c, 3, 3) and int(np.prod(w.shape[1:])) == 9 * c
        assert np.array_equal(w[:, :3], w0) and not w[:, 3:].any()
    w = numpy_helper.to_array(stem_weight(space_to_depth(original)))
    assert w.shape == (w0.shape[0], 12, 2, 2)  # K = 48
    assert np.count_nonzero(w) == np.count_nonzero(w0)  # rearranged, zeros added


def test_space_to_depth_is_dcr():
    """ONNX SpaceToDepth puts pixel (2i + dy, 2j + dx) of channel c in channel (dy * 2 + dx) * C + c, as ORT runs it."""
    x = np.arange(2 * 3 * 4 * 6, dtype=np.float32).reshape(2, 3, 4, 6)
    graph = helper.make_graph([helper.make_node("SpaceToDepth", ["input"], ["y"], blocksize=2)], "s2d",
                              [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [2, 3, 4, 6])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 12, 2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    y = run(model, x)
    for dy in (0, 1):
        for dx in (0, 1):
            np.testing.assert_array_equal(y[:, (dy * 2 + dx) * 3: (dy * 2 + dx + 1) * 3], x[:, :, dy::2, dx::2])


def test_refusals_are_one_line(graphs):
    with pytest.raises(ValueError, match=r"^space_to_depth: the stem must be a 3x3 stride-2 pad-1 group-1 conv, got "
                                         r"kernel \[3, 3\] stride \[1, 1\]") as err:
        space_to_depth(graphs["fp32", 1, 16])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"^pad_channels: channels must be one of \(4, 8, 16\), got 5$"):
        pad_channels(graphs["fp32", 2, 16], 5)
    with pytest.raises(ValueError, match="fewer than 4 channels"):
        pad_channels(pad_channels(graphs["fp32", 2, 16], 4), 4)
    with pytest.raises(ValueError, match=r"^stem rewrite: the stem is already rewritten"):
        pad_channels(space_to_depth(graphs["int8", 2, 16]), 16)


@pytest.mark.parametrize("stride", [1, 2])
def test_fp32_stem_runs_the_dequantized_kernel_on_the_float_input(graphs, stride, tmp_path):
    original = graphs["int8", stride, 16]
    rewritten = fp32_stem(original)
    check_contract(original, rewritten)
    stem = find_stem(rewritten)
    assert stem.input[0] == "input"  # no Q/DQ in front of it
    # its kernel is the INT8 one dequantized per output channel, so the one the INT8 file computes with
    producer = {o: n for n in original.graph.node for o in n.output}
    dq = producer[find_stem(original).input[1]]
    inits = {i.name: numpy_helper.to_array(i) for i in original.graph.initializer}
    q, scale, zero = (inits[producer[t].input[0]] if t in producer else inits[t] for t in dq.input[:3])
    expected = (q.astype(np.float32) - zero.reshape(-1, 1, 1, 1)) * scale.reshape(-1, 1, 1, 1)
    got = next(numpy_helper.to_array(i) for i in rewritten.graph.initializer if i.name == stem.input[1])
    assert got.dtype == np.float32 and np.array_equal(got, expected)
    assert len(rewritten.graph.node) < len(original.graph.node)  # the dropped input Q/DQ and weight DQ
    for x in inputs(16):
        ref = run(original, x)
        out = run(rewritten, x, optimized=str(tmp_path / "optimized.onnx"))
        # only the input's 8-bit rounding is gone: the logits move by a fraction of their range
        assert 0 < np.abs(out - ref).max() <= 0.1 * np.abs(ref).max()
    fused = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert fused.count("QLinearConv") == 2 and ("Conv" in fused or "FusedConv" in fused)  # the rest stays INT8


def test_fp32_stem_refuses_a_float_graph(graphs):
    with pytest.raises(ValueError, match=r"^fp32_stem: the stem's kernel is already float \(not an INT8 QDQ graph\)$"):
        fp32_stem(graphs["fp32", 2, 16])
