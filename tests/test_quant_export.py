"""INT8 quantization (PTQ, QAT) with NNCF and ONNX export/evaluation, on a tiny RepVGG trained on sklearn digits."""

import itertools

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from compress.evaluation import ParityError, check_int8_parity, compare_with_model, evaluate_onnx
from compress.export import export_onnx, op_counts
from compress.files import CheckpointError, model_record, save_model
from compress.quant import (
    is_quantized,
    layer_node_names,
    load_quantized,
    quantize_model,
    save_quantized,
    use_reference_kernels,
)
from compress.runtime import open_onnx
from repvgg import RepVGG, reparameterize

# NNCF's compiled fake-quant extension takes minutes to build on a fresh 2-core machine; same numbers without it.
use_reference_kernels()


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - 0.5) / 0.5
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


@pytest.fixture(scope="module")
def loaders(digits):
    (xtr, ytr), (xte, yte) = digits
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    test = DataLoader(TensorDataset(xte, yte), batch_size=100)
    return train, test


def accuracy(model, loader):
    model.eval()
    with torch.no_grad():
        hits = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    return 100.0 * hits / len(loader.dataset)


@pytest.fixture(scope="module")
def fp32(loaders):
    torch.manual_seed(0)
    train, test = loaders
    net = RepVGG([1, 1, 1, 1], widths=[8, 16, 16, 32, 32], num_classes=10)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for _ in range(3):
        for x, y in train:
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    plain = reparameterize(net.eval()).eval()
    assert accuracy(plain, test) > 85
    return plain


@pytest.fixture(scope="module")
def example():
    return torch.zeros(1, 3, 32, 32)


@pytest.fixture(scope="module")
def ptq(fp32, loaders, example):
    return quantize_model(fp32, loaders[0], example, calibration_size=256)


def mean_loss(model, loader):
    model.eval()
    with torch.no_grad():
        return float(np.mean([F.cross_entropy(model(x), y).item() for x, y in loader]))


@pytest.fixture(scope="module")
def qat(fp32, loaders, example):
    train, _ = loaders
    probe = list(itertools.islice(train, 4))  # fixed batches to compare the loss on
    log = {}

    def train_fn(qmodel):
        log["loss_before"] = mean_loss(qmodel, probe)
        log["w_before"] = qmodel.layers[1].conv.weight.detach().clone()
        opt = torch.optim.Adam(qmodel.parameters(), lr=1e-3)
        qmodel.train()
        for x, y in itertools.islice(itertools.cycle(train), 25):
            loss = F.cross_entropy(qmodel(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        log["loss_after"] = mean_loss(qmodel, probe)

    qmodel = quantize_model(fp32, train, example, calibration_size=128, train_fn=train_fn)
    return qmodel, log


def int8_graph_ok(path):
    counts = op_counts(path)
    assert counts.get("QuantizeLinear", 0) > 0 and counts.get("DequantizeLinear", 0) > 0, counts
    model = onnx.load(str(path))
    assert model.opset_import[0].version >= 17
    return model


def test_fp32_export_parity_and_eval(fp32, loaders, example, tmp_path):
    _, test = loaders
    path = export_onnx(fp32, tmp_path / "plain.onnx", example, opset=17)
    model = onnx.load(str(path))
    assert model.opset_import[0].version >= 17
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temp file
    assert compare_with_model(path, fp32, test)["cpu"]["max_abs_diff"] <= 1e-4
    session = open_onnx(path, "cpu", threads=1)
    for b in (1, 7):  # dynamic batch
        assert session.logits(torch.randn(b, 3, 32, 32).numpy()).shape == (b, 10)
    metrics = evaluate_onnx(path, test)
    assert metrics["top1"] == pytest.approx(accuracy(fp32, test), abs=0.3)
    assert metrics["top1"] <= metrics["top5"] <= 100
    assert metrics["predictions"].shape == (len(test.dataset),)
    assert fp32.training is False and next(fp32.parameters()).device.type == "cpu"


def test_ptq_int8_onnx_matches_fake_quant(ptq, fp32, loaders, example, tmp_path):
    _, test = loaders
    assert is_quantized(ptq) and not is_quantized(fp32)  # the float model is left alone
    path = export_onnx(ptq, tmp_path / "ptq.onnx", example, int8=True)
    int8_graph_ok(path)
    metrics = evaluate_onnx(path, test)
    with torch.no_grad():
        torch_pred = torch.cat([ptq(x).argmax(1) for x, _ in test]).numpy()
    agree = (metrics["predictions"] == torch_pred).mean()
    assert agree >= 0.99, agree
    assert metrics["top1"] >= accuracy(fp32, test) - 3


def test_int8_file_stores_int8_weights(ptq, example, tmp_path):
    raw = export_onnx(ptq, tmp_path / "raw.onnx", example, int8=True, fold_weights=False)
    folded = export_onnx(ptq, tmp_path / "folded.onnx", example, int8=True)
    graph = int8_graph_ok(folded).graph
    weights = {init.name: init for init in graph.initializer}
    # every conv and the head read their weight from an INT8 tensor in the file, through DequantizeLinear
    producer = {out: node for node in graph.node for out in node.output}
    layers = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    for node in layers:
        dq = producer[node.input[1]]
        assert dq.op_type == "DequantizeLinear" and weights[dq.input[0]].data_type == onnx.TensorProto.INT8
    assert op_counts(raw)["QuantizeLinear"] - op_counts(folded)["QuantizeLinear"] == len(layers)
    assert not any(init.data_type == onnx.TensorProto.FLOAT and init.name.endswith(".weight") for init in graph.initializer)
    assert folded.stat().st_size < 0.5 * raw.stat().st_size
    x = torch.randn(16, 3, 32, 32)  # the same numbers, bit for bit
    np.testing.assert_array_equal(open_onnx(raw).logits(x.numpy()), open_onnx(folded).logits(x.numpy()))


def test_qat_trains_and_exports(qat, loaders, example, tmp_path):
    qmodel, log = qat
    _, test = loaders
    assert log["loss_after"] < log["loss_before"]
    assert not torch.equal(log["w_before"], qmodel.layers[1].conv.weight)
    assert not qmodel.training
    path = export_onnx(qmodel, tmp_path / "qat.onnx", example, int8=True)
    int8_graph_ok(path)
    metrics = evaluate_onnx(path, test)
    with torch.no_grad():
        torch_pred = torch.cat([qmodel(x).argmax(1) for x, _ in test]).numpy()
    assert (metrics["predictions"] == torch_pred).mean() >= 0.99
    assert metrics["top1"] > 85


def test_fp32_first_last_keeps_first_conv_and_head_float(fp32, loaders, example, tmp_path):
    qmodel = quantize_model(fp32, loaders[0], example, calibration_size=64, fp32_first_last=True)
    path = export_onnx(qmodel, tmp_path / "mixed.onnx", example, int8=True)
    graph = int8_graph_ok(path).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    heads = [n for n in graph.node if n.op_type in ("Gemm", "MatMul")]
    assert producer.get(convs[0].input[0]) != "DequantizeLinear"  # float input
    assert producer.get(convs[0].input[1]) != "DequantizeLinear"  # float weight
    assert producer.get(convs[1].input[0]) == "DequantizeLinear"  # the middle stays INT8
    assert all(producer.get(n.input[0]) != "DequantizeLinear" for n in heads)
    assert all(producer.get(n.input[1]) != "DequantizeLinear" for n in heads)


def test_keep_fp32_keeps_the_named_layer_float(fp32, loaders, example, tmp_path):
    names = layer_node_names(fp32, example)
    assert len(names) == len(fp32.layers) + 1 and names[-1].startswith("linear")
    qmodel = quantize_model(fp32, loaders[0], example, calibration_size=64, keep_fp32=[names[2]])
    graph = int8_graph_ok(export_onnx(qmodel, tmp_path / "one_float.onnx", example, int8=True)).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    weights = [producer.get(n.input[1]) for n in graph.node if n.op_type == "Conv"]
    assert [w == "DequantizeLinear" for w in weights] == [i != 2 for i in range(len(weights))]


def test_save_load_quantized_round_trip(qat, fp32, example, tmp_path):
    qmodel, _ = qat
    path = tmp_path / "q" / "qat.pt"
    save_quantized(qmodel, path, model_record(fp32), stage="quantize")
    loaded = load_quantized(path, example)
    assert is_quantized(loaded) and type(loaded) is type(fp32)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
    # the loaded model exports like the original
    a = export_onnx(qmodel, tmp_path / "a.onnx", example, int8=True)
    b = export_onnx(loaded, tmp_path / "b.onnx", example, int8=True)
    np.testing.assert_array_equal(open_onnx(a).logits(x.numpy()), open_onnx(b).logits(x.numpy()))


def test_load_quantized_rejects_float_checkpoint(fp32, tmp_path):
    save_model(fp32, tmp_path / "fp32.pt")
    with pytest.raises(CheckpointError, match="not a quantized model"):
        load_quantized(tmp_path / "fp32.pt")


def test_export_errors(fp32, example, tmp_path):
    with pytest.raises(ValueError, match="int8=True needs a model quantized"):
        export_onnx(fp32, tmp_path / "x.onnx", example, int8=True)
    with pytest.raises(ValueError, match="opset must be >= 17"):
        export_onnx(fp32, tmp_path / "x.onnx", example, opset=13)
    narrow = reparameterize(RepVGG([1, 1, 1, 1], widths=[8, 16, 16, 32, 32], num_classes=10).eval())
    conv = narrow.layers[2].conv  # what a pruner leaves when it removes every channel
    conv.weight = torch.nn.Parameter(conv.weight[:0])
    conv.bias = torch.nn.Parameter(conv.bias[:0])
    conv.out_channels = 0
    with pytest.raises(ValueError, match=r"^cannot export: layer 'layers.2.conv' has zero width \(16->0 channels\)$"):
        export_onnx(narrow, tmp_path / "zero.onnx", example)
    assert not (tmp_path / "zero.onnx").exists()


def test_int8_parity_passes_and_a_perturbed_weight_scale_fails_in_one_line(qat, loaders, example, tmp_path):
    qmodel, _ = qat
    _, test = loaders
    path = export_onnx(qmodel, tmp_path / "qat.onnx", example, int8=True)
    result = compare_with_model(path, qmodel, test)["cpu"]
    assert result["agreement"] >= 0.99 and result["n"] == len(test.dataset)
    assert result["max_abs_diff"] < 0.05 * result["logit_range"] and result["mean_abs_diff"] <= result["max_abs_diff"]
    assert abs(result["onnx_top1"] - result["torch_top1"]) <= 1.0
    check_int8_parity(path, result, 0.99)  # passes: nothing raised

    # the same file with one conv's weight scales shrunk: its INT8 weights now dequantize to a tenth
    model = onnx.load(str(path))
    producer = {out: node for node in model.graph.node for out in node.output}
    conv = [n for n in model.graph.node if n.op_type == "Conv"][1]
    scale_name = producer[conv.input[1]].input[1]
    scale = next(i for i in model.graph.initializer if i.name == scale_name)
    scale.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(scale) * 0.1, scale_name))
    broken = tmp_path / "perturbed.onnx"
    onnx.save(model, str(broken))
    bad = compare_with_model(broken, qmodel, test)["cpu"]
    assert bad["agreement"] < 0.99
    with pytest.raises(ParityError) as err:
        check_int8_parity(broken, bad, 0.99)
    line = str(err.value)
    assert "\n" not in line and str(broken) in line and "ORT CPU" in line and "CPU " in line
    assert f"{100 * bad['agreement']:.1f}% of {bad['n']} images" in line


def test_target_device_resolves_the_overflow_fix_from_the_cpu_flags(monkeypatch):
    from compress import deploy
    from compress.recipe import validate_recipe

    raw = {"name": "r", "model": {"name": "RepVGG-A0"}}
    for flags, target, fix in ((["avx2", "avx512f", "avx512_vnni"], "cpu-vnni", "disable"),
                               (["avx2", "avx_vnni"], "cpu-vnni", "disable"),
                               (["avx2", "amx_int8"], "cpu-vnni", "disable"),
                               (["avx2", "avx512f"], "cpu-avx2", "enable"),
                               (["avx2"], "cpu-avx2", "enable")):
        monkeypatch.setattr(deploy, "cpu_flags", lambda flags=flags: flags)
        quantize = validate_recipe(raw).resolved("cpu").quantize
        assert (quantize.target_device, quantize.overflow_fix) == (target, fix), flags
        assert validate_recipe(raw).resolved("cuda").quantize.target_device == "gpu"
    # an explicit target or fix is kept; the fix follows an explicit target
    explicit = validate_recipe({**raw, "quantize": {"target_device": "cpu-vnni"}}).resolved("cpu").quantize
    assert (explicit.target_device, explicit.overflow_fix) == ("cpu-vnni", "disable")
    kept = validate_recipe({**raw, "quantize": {"overflow_fix": "first_layer_only"}}).resolved("cpu").quantize
    assert kept.overflow_fix == "first_layer_only"


def test_a_file_for_vnni_warns_on_a_cpu_without_it(ptq, example, tmp_path):
    from compress.deploy import METADATA_KEY, file_target, isa_warning

    path = export_onnx(ptq, tmp_path / "vnni.onnx", example, int8=True, metadata={METADATA_KEY: "cpu-vnni"})
    assert file_target(path) == "cpu-vnni"
    warning = isa_warning(path, flags=["avx2", "avx512f"])
    assert warning.startswith(f"warning: {path} was quantized for cpu-vnni") and "cpu-avx2" in warning
    assert isa_warning(path, flags=["avx2", "avx512_vnni"]) is None
    plain = export_onnx(ptq, tmp_path / "avx2.onnx", example, int8=True, metadata={METADATA_KEY: "cpu-avx2"})
    assert isa_warning(plain, flags=["avx2"]) is None


@pytest.mark.parametrize("ranges,batchwise", [("histogram", True), ("minmax", False)])
def test_activation_range_settings_calibrate_a_working_int8_model(fp32, loaders, example, ranges, batchwise):
    _, test = loaders
    qmodel = quantize_model(fp32, loaders[0], example, calibration_size=128, activation_ranges=ranges,
                            batchwise_statistics=batchwise)
    assert is_quantized(qmodel) and accuracy(qmodel, test) >= accuracy(fp32, test) - 3
    with pytest.raises(ValueError, match="activation_ranges must be one of"):
        quantize_model(fp32, loaders[0], example, calibration_size=16, activation_ranges="percentile")
