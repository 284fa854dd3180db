"""Latency benchmark (ONNX Runtime CPU, OpenVINO, torch eager) and the accuracy-latency figure, on tiny plain models.

The GPU providers' IOBinding path runs here on ORT's CPU device: same code, 'cpu' OrtValues."""

import weakref

import numpy as np
import pytest
import torch

import compress.bench.runner as runner
import compress.bench.runtimes as runtimes
from compress.bench import (
    accuracy_latency_figure,
    benchmark,
    iobinding_step,
    openvino_unavailable,
    save_figure,
    torch_step,
)
from compress.bench.runtimes import TIMING_HOST, TIMING_IOBINDING
from compress.export import INPUT_NAME, OUTPUT_NAME, export_onnx, onnx_session
from compress.recipe import BenchCfg
from repvgg import LayerSpec, PlainRepVGG

SIZE = 32


def plain(widths):
    specs, cin = [], 3
    for i, w in enumerate(widths):
        specs.append(LayerSpec(cin, w, 2 if i < 3 else 1))
        cin = w
    torch.manual_seed(0)
    return PlainRepVGG(specs, num_classes=10).eval()


@pytest.fixture(scope="module")
def models():
    return {"plain_fp32": plain([8, 16, 32, 32]), "pruned_fp32": plain([8, 8, 16, 16])}


@pytest.fixture(scope="module")
def artifacts(models, tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    x = torch.zeros(1, 3, SIZE, SIZE)
    return {name: export_onnx(m, d / f"{name}.onnx", x) for name, m in models.items()}


def fast_cfg(**kw):
    return BenchCfg(**{"batch_sizes": [1, 4], "threads": 1, "warmup": 1, "iters": 3, "rounds": 2, **kw})


def test_benchmark_reports_every_artifact_batch_and_ratio(artifacts, models):
    out = benchmark(artifacts, fast_cfg(providers=["torch", "cpu"]), SIZE, torch_models=models)
    rows = {(r["artifact"], r["provider"], r["batch"]): r for r in out["results"]}
    expected = {(a, p, b) for a in artifacts for p in ("cpu", "torch") for b in (1, 4)}
    assert set(rows) == expected
    for r in rows.values():
        assert r["median_ms"] > 0 and r["p90_ms"] > 0 and r["images_per_s"] > 0
        assert r["images_per_s"] == pytest.approx(r["batch"] * 1000 / r["median_ms"])
        assert len(r["round_medians_ms"]) == 2
    # main batch = the first batch size; the CPU provider's ratio is unsuffixed
    assert set(out["ratios"]) == {"pruned_fp32/plain_fp32", "pruned_fp32/plain_fp32@torch"}
    assert all(v > 0 for v in out["ratios"].values())
    detail = [d for d in out["ratio_details"] if d["batch"] == 4]
    assert len(detail) == 2 and all(len(d["per_round"]) == 2 for d in detail)
    assert {r["timing"] for r in rows.values() if r["provider"] == "cpu"} == {TIMING_HOST}
    assert {r["timing"] for r in rows.values() if r["provider"] == "torch"} == {"torch eager, input on cpu"}
    m = out["machine"]
    assert m["cpu"] and m["threads"] == 1 and m["onnxruntime"] and m["torch"] == torch.__version__
    assert "cpu" in m["providers"] and "torch" in m["providers"]


@pytest.fixture
def opened(monkeypatch):
    """Spies on the benchmark loop's ORT sessions and OpenVINO compiled models (the real ones, wrapped): `order` lists each
    opened as (runtime, artifact), `peak` is the most alive at once."""
    live, log = weakref.WeakSet(), {"order": [], "peak": 0}

    class Tracked:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

    def track(factory: str, runtime: str):
        real = getattr(runtimes, factory)

        def tracked(path, *args, **kwargs):
            opened = Tracked(real(path, *args, **kwargs))
            live.add(opened)
            log["peak"] = max(log["peak"], len(live))
            log["order"].append((runtime, path.stem))
            return opened

        monkeypatch.setattr(runtimes, factory, tracked)

    track("onnx_session", "ort")
    track("openvino_model", "openvino")
    return log


def test_one_session_at_a_time_round_robin(artifacts, opened):
    out = benchmark(artifacts, fast_cfg(rounds=3, providers=["cpu"]), SIZE, reference="plain_fp32")
    assert opened["peak"] == 1
    assert [name for _, name in opened["order"]] == [
        "plain_fp32", "pruned_fp32", "pruned_fp32", "plain_fp32", "plain_fp32", "pruned_fp32"
    ]
    assert set(out["ratios"]) == {"pruned_fp32/plain_fp32"}


@pytest.mark.skipif(openvino_unavailable() is not None, reason=str(openvino_unavailable()))
def test_one_runtime_at_a_time_across_ort_and_openvino(artifacts, opened):
    benchmark(artifacts, fast_cfg(rounds=2, providers=["cpu", "openvino"]), SIZE)
    assert opened["peak"] == 1
    jobs = [(runtime, name) for runtime in ("ort", "openvino") for name in ("plain_fp32", "pruned_fp32")]
    assert opened["order"] == jobs + jobs[1:] + jobs[:1]  # the second round starts one job later


def test_unavailable_provider_is_skipped_and_said(artifacts, monkeypatch):
    monkeypatch.setattr(runner, "available_providers", lambda: ["cpu"])
    out = benchmark(artifacts, fast_cfg(batch_sizes=[1], rounds=1, providers=["cuda", "cpu"]), SIZE)
    assert {r["provider"] for r in out["results"]} == {"cpu"}
    assert out["machine"]["skipped_providers"] == {"cuda": "not available here"}
    assert out["machine"]["providers"] == ["cpu"]


def test_iobinding_step_equals_session_run(artifacts):
    session = onnx_session(artifacts["plain_fp32"], "cpu", threads=1)
    batch = np.random.default_rng(1).standard_normal((4, 3, SIZE, SIZE), dtype=np.float32)
    step = iobinding_step(session, batch, "cpu")
    expected = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
    for _ in range(2):  # the bound input and output are reused from one call to the next
        out = step()
        assert out.device_name() == "cpu" and out.shape() == [4, 10]
        np.testing.assert_array_equal(out.numpy(), expected)


def test_torch_step_equals_eager_forward(models):
    batch = np.random.default_rng(2).standard_normal((2, 3, SIZE, SIZE), dtype=np.float32)
    model = models["pruned_fp32"]
    out = torch_step(model, batch, torch.device("cpu"))()
    with torch.no_grad():
        assert torch.equal(out, model(torch.from_numpy(batch)))


def test_iobinding_providers_are_timed_through_iobinding_and_say_so(artifacts, monkeypatch):
    """A provider listed in IOBINDING_DEVICE (CUDA and TensorRT; here CPU, which ORT also binds) is timed with
    `iobinding_step`, once per (artifact, batch, round), and its results say so."""
    bound = []
    real = runtimes.iobinding_step

    def spy(session, batch, device):
        bound.append((batch.shape[0], device))
        return real(session, batch, device)

    monkeypatch.setattr(runtimes, "IOBINDING_DEVICE", {"cpu": "cpu"})
    monkeypatch.setattr(runtimes, "iobinding_step", spy)
    out = benchmark(artifacts, fast_cfg(providers=["cpu"]), SIZE)
    assert sorted(bound) == sorted([(b, "cpu") for b in (1, 4) for _ in artifacts for _ in range(2)])
    assert {r["timing"] for r in out["results"]} == {TIMING_IOBINDING}
    assert all(r["median_ms"] > 0 for r in out["results"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip where CUDA is absent")
def test_torch_on_cuda_without_cuda_is_skipped_and_said(artifacts, models):
    out = benchmark(artifacts, fast_cfg(batch_sizes=[1], rounds=1, providers=["torch", "cpu"]), SIZE,
                    torch_models=models, torch_device="cuda")
    assert {r["provider"] for r in out["results"]} == {"cpu"}
    assert "CUDA is not available" in out["machine"]["skipped_providers"]["torch"]


def test_benchmark_errors(artifacts, tmp_path):
    with pytest.raises(FileNotFoundError, match="artifact 'gone' not found"):
        benchmark({"gone": tmp_path / "gone.onnx"}, fast_cfg(providers=["cpu"]), SIZE)
    with pytest.raises(ValueError, match="main_batch=2 is not one of"):
        benchmark(artifacts, fast_cfg(main_batch=2, providers=["cpu"]), SIZE)


def test_accuracy_latency_figure(tmp_path):
    points = [
        {"name": "plain_fp32", "latency_ms": 4.0, "top1": 75.0},
        {"name": "pruned_fp32", "latency_ms": 2.5, "top1": 73.5},
        {"name": "pruned_int8", "latency_ms": 1.2, "top1": 73.0},
    ]
    fig = accuracy_latency_figure(points)
    ax = fig.axes[0]
    offsets = ax.collections[0].get_offsets().tolist()
    assert offsets == [[p["latency_ms"], p["top1"]] for p in points]
    assert {t.get_text() for t in ax.texts} == {p["name"] for p in points}
    assert "latency" in ax.get_xlabel() and "top-1" in ax.get_ylabel()
    path = save_figure(fig, tmp_path / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
