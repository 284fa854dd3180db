"""OpenVINO as a second CPU runtime: our exported FP32 and INT8 (QDQ) files run in it as in ONNX Runtime, and the
benchmark times it beside ORT's CPU provider, or skips it with a line where the package is missing.

The files come from a tiny plain RepVGG trained for a few seconds on digits at 16x16, exported as the pipeline
does (PTQ INT8 with INT8 weight initializers)."""

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from compress.bench import BenchOptions, benchmark
from compress.data import build_data
from compress.export import export_onnx
from compress.quant import quantize_model, use_reference_kernels
from compress.recipe import DataCfg
from compress.runtime import RUNTIMES, open_onnx
from compress.runtime.onnxruntime_ep import TIMING_HOST
from compress.runtime.openvino_cpu import TIMING_OPENVINO
from compress.stages.bench import int8_speedups
from repvgg import LayerSpec, PlainRepVGG

SIZE = 16
OPENVINO_MISSING = RUNTIMES["openvino"].unavailable()
needs_openvino = pytest.mark.skipif(OPENVINO_MISSING is not None, reason=str(OPENVINO_MISSING))


@pytest.fixture(scope="module")
def digits():
    return build_data(DataCfg(kind="digits", image_size=SIZE, batch_size=64, augment="none"))


@pytest.fixture(scope="module")
def test_images(digits):
    return torch.cat([images for images, _ in digits.test_loader()])


@pytest.fixture(scope="module")
def exported(digits, tmp_path_factory):
    """{"plain_fp32": path, "plain_int8": path}: the trained model and its PTQ INT8 twin, exported to ONNX."""
    use_reference_kernels()  # NNCF's compiled extension would take minutes to build; same numbers without it
    specs, cin = [], 3
    for i, width in enumerate([8, 16, 16, 32]):
        specs.append(LayerSpec(cin, width, 2 if i < 3 else 1))
        cin = width
    torch.manual_seed(0)
    model = PlainRepVGG(specs, num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: 0.1 s; two, on a busy 2-core CPU: 12 s
    try:
        for epoch in range(3):
            for x, y in digits.train_loader(epoch):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    example = digits.example_input()
    int8 = quantize_model(model, digits.calibration_loader(128), example, calibration_size=128)
    d = tmp_path_factory.mktemp("ov_onnx")
    return {
        "plain_fp32": export_onnx(model, d / "plain_fp32.onnx", example),
        "plain_int8": export_onnx(int8, d / "plain_int8.onnx", example, int8=True),
    }


def conv_precisions(compiled) -> set[str]:
    """The precisions OpenVINO's CPU plugin runs the convolutions of a compiled model at (its runtime graph)."""
    infos = [op.get_rt_info() for op in compiled.get_runtime_model().get_ordered_ops()]
    return {i["runtimePrecision"].astype(str) for i in infos if i["layerType"].astype(str) == "Convolution"}


def fast_options(**kw) -> BenchOptions:
    return BenchOptions(**{"batch_sizes": (1, 4), "threads": 1, "warmup": 1, "iters": 3, "rounds": 2, **kw})


@needs_openvino
def test_our_fp32_and_int8_files_run_in_openvino_as_in_onnx_runtime(exported, test_images):
    images = test_images.numpy()
    ort = {name: open_onnx(p, "cpu", threads=1).logits(images) for name, p in exported.items()}
    compiled = {name: open_onnx(p, "openvino", threads=1) for name, p in exported.items()}
    ov = {name: session.logits(images) for name, session in compiled.items()}
    fp32, int8 = "plain_fp32", "plain_int8"
    assert ov[fp32].shape == ov[int8].shape == (len(test_images), 10)
    scale = max(1.0, float(np.abs(ort[fp32]).max()))
    np.testing.assert_allclose(ov[fp32], ort[fp32], rtol=0, atol=1e-4 * scale)
    np.testing.assert_array_equal(ov[fp32].argmax(1), ort[fp32].argmax(1))
    # INT8: both run integer convolutions, but round the requantized activations their own way
    assert np.abs(ov[int8] - ort[int8]).max() <= 0.02 * scale
    assert (ov[int8].argmax(1) == ort[int8].argmax(1)).mean() >= 0.99
    # the FP32 file runs at FP32 even where the CPU plugin defaults to BF16; the QDQ file runs INT8 kernels
    assert conv_precisions(compiled[fp32].compiled) == {"f32"}
    assert conv_precisions(compiled[int8].compiled) <= {"u8", "i8"}


@needs_openvino
def test_openvino_is_timed_beside_onnx_runtime_cpu(exported):
    import openvino

    out = benchmark(exported, fast_options(runtimes=["cpu", "openvino"]), SIZE)
    rows = {(r["artifact"], r["provider"], r["batch"]): r for r in out["results"]}
    assert set(rows) == {(a, p, b) for a in exported for p in ("cpu", "openvino") for b in (1, 4)}
    assert all(r["median_ms"] > 0 and len(r["round_medians_ms"]) == 2 for r in rows.values())
    assert {r["timing"] for r in rows.values() if r["provider"] == "openvino"} == {TIMING_OPENVINO}
    assert {r["timing"] for r in rows.values() if r["provider"] == "cpu"} == {TIMING_HOST}
    # each runtime has its own ratios and INT8 speed-ups, against its own FP32 timings
    assert set(out["ratios"]) == {"plain_int8/plain_fp32", "plain_int8/plain_fp32@openvino"}
    assert {(d["provider"], d["batch"]) for d in out["ratio_details"]} == {
        (p, b) for p in ("cpu", "openvino") for b in (1, 4)
    }
    assert set(int8_speedups(out["results"], 1)) == {"plain_int8@cpu", "plain_int8@openvino"}
    assert out["machine"]["providers"] == ["cpu", "openvino"]
    assert out["machine"]["openvino"] == openvino.__version__
    assert out["machine"]["skipped_providers"] == {}


@needs_openvino
def test_all_providers_include_openvino_where_installed(exported):
    out = benchmark(exported, fast_options(batch_sizes=[1], rounds=1, runtimes=None), SIZE)
    assert "openvino" in out["machine"]["providers"]
    assert {r["artifact"] for r in out["results"] if r["provider"] == "openvino"} == set(exported)


def test_without_openvino_it_is_skipped_and_said(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    out = benchmark(exported, fast_options(batch_sizes=[1], rounds=1, runtimes=["cpu", "openvino"]), SIZE)
    assert {r["provider"] for r in out["results"]} == {"cpu"}
    assert out["machine"]["skipped_providers"] == {
        "openvino": "the openvino package is not installed (pip install openvino)"
    }
    assert "openvino" not in out["machine"]
    # asked for all providers: left out without a word, it was never asked for by name
    out = benchmark(exported, fast_options(batch_sizes=[1], rounds=1, runtimes=None), SIZE)
    assert "openvino" not in out["machine"]["providers"] and out["machine"]["skipped_providers"] == {}
    with pytest.raises(ModuleNotFoundError, match="pip install openvino"):
        open_onnx(exported["plain_fp32"], "openvino")
