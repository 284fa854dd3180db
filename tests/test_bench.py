"""Latency benchmark (ONNX Runtime CPU, OpenVINO, torch eager) and the accuracy-latency figure, on tiny plain models.

The GPU providers' IOBinding path runs here on ORT's CPU device: same code, 'cpu' OrtValues."""

import itertools
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

import compress.runtime.onnxruntime_ep as onnxruntime_ep
import compress.timing as timing
from compress.bench import BenchOptions, benchmark
from compress.export import export_onnx
from compress.figures import accuracy_latency_figure, save_figure
from compress.runtime import RUNTIMES, open_onnx
from compress.runtime.onnxruntime_ep import TIMING_HOST, TIMING_IOBINDING, OrtRuntime
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


def fast_options(**kw) -> BenchOptions:
    return BenchOptions(**{"batch_sizes": (1, 4), "threads": 1, "warmup": 1, "iters": 3, "rounds": 2, **kw})


def test_each_round_gives_its_median_and_its_fastest_call(artifacts, monkeypatch):
    # the timer's readings (a host fact, faked), in the order the files are timed: plain, pruned; then pruned, plain
    readings = iter([[3.0, 1.0, 2.0], [6.0, 2.0, 4.0], [8.0, 8.0, 8.0], [5.0, 4.0, 6.0]])
    monkeypatch.setattr(timing, "time_calls", lambda step, warmup, iters, clock=None: next(readings))
    out = benchmark(artifacts, fast_options(runtimes=["cpu"], batch_sizes=(1,)), SIZE, reference="plain_fp32")
    rows = {r["artifact"]: r for r in out["results"]}
    plain, pruned = rows["plain_fp32"], rows["pruned_fp32"]
    assert plain["round_medians_ms"] == [2.0, 5.0] and plain["round_fastest_ms"] == [1.0, 4.0]
    assert plain["fastest_ms"] == 1.0 and plain["median_ms"] == 3.5  # the latency; the median beside it
    assert plain["images_per_s"] == 1000.0  # batch 1 at its fastest call
    assert pruned["round_fastest_ms"] == [2.0, 8.0]
    # the ratio: the median of same-round ratios of fastest calls (2/1, 8/4), not of medians (4/2, 8/5)
    assert out["ratios"] == {"pruned_fp32/plain_fp32": 2.0}


def timed_as(monkeypatch, artifacts, rounds: list[float], then: float = 1.0) -> None:
    """A faked timer (a host fact): every call of every file takes `rounds[k]` ms in round k, `then` ms after them
    (2.0: other work slowed the machine)."""
    calls = itertools.count()
    monkeypatch.setattr(timing, "time_calls", lambda step, warmup, iters, clock=None: [
        (rounds + [then] * 100)[next(calls) // len(artifacts)]] * iters)


def test_rounds_continue_until_every_file_has_quiet_rounds(artifacts, monkeypatch):
    timed_as(monkeypatch, artifacts, [1.0, 2.0, 2.0, 2.0, 2.0])  # one quiet round, then four disturbed ones
    out = benchmark(artifacts, fast_options(runtimes=["cpu"], batch_sizes=(1,), max_rounds=20), SIZE)
    assert out["settings"]["rounds"] == 5 + timing.QUIET_ROUNDS - 1
    for r in out["results"]:
        assert timing.undisturbed(r["round_fastest_ms"]) == [True] + [False] * 4 + [True] * (timing.QUIET_ROUNDS - 1)


def test_rounds_stop_at_max_rounds_or_at_rounds_without_it(artifacts, monkeypatch):
    timed_as(monkeypatch, artifacts, [1.0], then=2.0)  # quiet once, then disturbed for good
    out = benchmark(artifacts, fast_options(runtimes=["cpu"], batch_sizes=(1,), max_rounds=5), SIZE)
    assert out["settings"]["rounds"] == 5
    timed_as(monkeypatch, artifacts, [1.0], then=2.0)
    out = benchmark(artifacts, fast_options(runtimes=["cpu"], batch_sizes=(1,)), SIZE)
    assert out["settings"]["rounds"] == 2  # no max_rounds: exactly `rounds`
    timed_as(monkeypatch, artifacts, [])  # quiet throughout: no round past `rounds` needed once it has enough
    out = benchmark(artifacts, fast_options(runtimes=["cpu"], batch_sizes=(1,), max_rounds=9), SIZE)
    assert out["settings"]["rounds"] == max(2, timing.QUIET_ROUNDS)


def test_benchmark_reports_every_artifact_batch_and_ratio(artifacts, models):
    out = benchmark(artifacts, fast_options(runtimes=["torch", "cpu"]), SIZE, torch_models=models)
    rows = {(r["artifact"], r["provider"], r["batch"]): r for r in out["results"]}
    expected = {(a, p, b) for a in artifacts for p in ("cpu", "torch") for b in (1, 4)}
    assert set(rows) == expected
    for r in rows.values():
        assert r["fastest_ms"] == min(r["round_fastest_ms"]) and r["fastest_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["images_per_s"] == pytest.approx(r["batch"] * 1000 / r["fastest_ms"])
        assert len(r["round_medians_ms"]) == len(r["round_fastest_ms"]) == 2
        assert all(0 < fast <= med for fast, med in zip(r["round_fastest_ms"], r["round_medians_ms"]))
    # main batch = the first batch size; the CPU provider's ratio is unsuffixed; each the engine's ratio
    assert set(out["ratios"]) == {"pruned_fp32/plain_fp32", "pruned_fp32/plain_fp32@torch"}
    for key, provider in (("pruned_fp32/plain_fp32", "cpu"), ("pruned_fp32/plain_fp32@torch", "torch")):
        assert out["ratios"][key] == timing.ratio_of_rounds(rows[("pruned_fp32", provider, 1)]["round_fastest_ms"],
                                                             rows[("plain_fp32", provider, 1)]["round_fastest_ms"])
    detail = [d for d in out["ratio_details"] if d["batch"] == 4]
    assert len(detail) == 2 and all(len(d["per_round"]) == 2 for d in detail)
    assert {r["timing"] for r in rows.values() if r["provider"] == "cpu"} == {TIMING_HOST}
    assert {r["timing"] for r in rows.values() if r["provider"] == "torch"} == {"torch eager, input on cpu"}
    m = out["machine"]
    assert m["cpu"] and m["threads"] == 1 and m["onnxruntime"] and m["torch"] == torch.__version__
    assert "cpu" in m["providers"] and "torch" in m["providers"]


class Tracked:
    """A registered runtime, opened through the real one: logs each model it opens as (runtime, name) in `log`,
    and the most sessions alive at once."""

    def __init__(self, inner, log: dict, live: weakref.WeakSet):
        self.inner, self.log, self.live = inner, log, live
        self.name, self.label, self.opens = inner.name, inner.label, inner.opens

    def unavailable(self, *args, **kwargs):
        return self.inner.unavailable(*args, **kwargs)

    def version(self):
        return self.inner.version()

    def open(self, model, threads=None, device="cpu"):
        session = self.inner.open(model, threads, device)
        self.live.add(session)
        self.log["peak"] = max(self.log["peak"], len(self.live))
        self.log["order"].append((self.name, Path(model).stem))
        return session


@pytest.fixture
def opened(monkeypatch):
    """Spies on the sessions the benchmark loop opens on ORT's CPU provider and OpenVINO (the real ones):
    `order` lists each opened as (runtime, artifact), `peak` is the most alive at once."""
    live, log = weakref.WeakSet(), {"order": [], "peak": 0}
    for name in ("cpu", "openvino"):
        monkeypatch.setitem(RUNTIMES, name, Tracked(RUNTIMES[name], log, live))
    return log


def test_one_session_at_a_time_round_robin(artifacts, opened):
    out = benchmark(artifacts, fast_options(rounds=3, runtimes=["cpu"]), SIZE, reference="plain_fp32")
    assert opened["peak"] == 1
    assert [name for _, name in opened["order"]] == [
        "plain_fp32", "pruned_fp32", "pruned_fp32", "plain_fp32", "plain_fp32", "pruned_fp32"
    ]
    assert set(out["ratios"]) == {"pruned_fp32/plain_fp32"}


@pytest.mark.skipif(RUNTIMES["openvino"].unavailable() is not None, reason=str(RUNTIMES["openvino"].unavailable()))
def test_one_runtime_at_a_time_across_ort_and_openvino(artifacts, opened):
    benchmark(artifacts, fast_options(rounds=2, runtimes=["cpu", "openvino"]), SIZE)
    assert opened["peak"] == 1
    jobs = [(runtime, name) for runtime in ("cpu", "openvino") for name in ("plain_fp32", "pruned_fp32")]
    # the second round starts half the jobs later: four jobs' starts spread over two rounds
    assert opened["order"] == jobs + jobs[2:] + jobs[:2]


def test_unavailable_provider_is_skipped_and_said(artifacts, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # ORT's CUDA provider needs a CUDA device
    out = benchmark(artifacts, fast_options(batch_sizes=[1], rounds=1, runtimes=["cuda", "cpu"]), SIZE)
    assert {r["provider"] for r in out["results"]} == {"cpu"}
    assert out["machine"]["skipped_providers"] == {"cuda": "not available here"}
    assert out["machine"]["providers"] == ["cpu"]


def test_iobinding_step_equals_session_run(artifacts):
    bound = OrtRuntime("cpu", "ORT CPU", ("CPUExecutionProvider",), iobinding_device="cpu")
    session = bound.open(artifacts["plain_fp32"], threads=1)
    batch = np.random.default_rng(1).standard_normal((4, 3, SIZE, SIZE), dtype=np.float32)
    step = session.step(batch)
    expected = open_onnx(artifacts["plain_fp32"], "cpu", threads=1).logits(batch)
    assert session.timing == TIMING_IOBINDING
    for _ in range(2):  # the bound input and output are reused from one call to the next
        out = step()
        assert out.device_name() == "cpu" and out.shape() == [4, 10]
        np.testing.assert_array_equal(out.numpy(), expected)


def test_torch_step_equals_eager_forward(models):
    batch = np.random.default_rng(2).standard_normal((2, 3, SIZE, SIZE), dtype=np.float32)
    model = models["pruned_fp32"]
    session = RUNTIMES["torch"].open(model)
    assert session.model is not model  # a copy: the caller's model is left as it is
    out = session.step(batch)()
    with torch.no_grad():
        expected = model(torch.from_numpy(batch))
    assert torch.equal(out, expected)
    np.testing.assert_array_equal(session.logits(batch), expected.numpy())


def test_iobinding_providers_are_timed_through_iobinding_and_say_so(artifacts, monkeypatch):
    """A runtime bound on a device (CUDA and TensorRT; here ORT's CPU, which ORT also binds) is timed through
    IOBinding, once per (artifact, batch, round), and its results say so."""
    bound = []
    real = onnxruntime_ep._iobinding_step

    def spy(session, batch, device):
        bound.append((batch.shape[0], device))
        return real(session, batch, device)

    monkeypatch.setitem(RUNTIMES, "cpu", OrtRuntime("cpu", "ORT CPU", ("CPUExecutionProvider",), iobinding_device="cpu"))
    monkeypatch.setattr(onnxruntime_ep, "_iobinding_step", spy)
    out = benchmark(artifacts, fast_options(runtimes=["cpu"]), SIZE)
    assert sorted(bound) == sorted([(b, "cpu") for b in (1, 4) for _ in artifacts for _ in range(2)])
    assert {r["timing"] for r in out["results"]} == {TIMING_IOBINDING}
    assert all(r["fastest_ms"] == min(r["round_fastest_ms"]) for r in out["results"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip where CUDA is absent")
def test_torch_on_cuda_without_cuda_is_skipped_and_said(artifacts, models):
    out = benchmark(artifacts, fast_options(batch_sizes=[1], rounds=1, runtimes=["torch", "cpu"]), SIZE,
                    torch_models=models, torch_device="cuda")
    assert {r["provider"] for r in out["results"]} == {"cpu"}
    assert "CUDA is not available" in out["machine"]["skipped_providers"]["torch"]


def test_benchmark_errors(artifacts, tmp_path):
    with pytest.raises(FileNotFoundError, match="artifact 'gone' not found"):
        benchmark({"gone": tmp_path / "gone.onnx"}, fast_options(runtimes=["cpu"]), SIZE)
    with pytest.raises(ValueError, match="main_batch=2 is not one of"):
        benchmark(artifacts, fast_options(main_batch=2, runtimes=["cpu"]), SIZE)
    with pytest.raises(ValueError, match=r"^unknown runtime 'ort'; valid: cpu, cuda, tensorrt, openvino, torch$"):
        benchmark(artifacts, fast_options(runtimes=["ort"]), SIZE)


def test_options_hold_tuples():
    options = BenchOptions(batch_sizes=[1, 4], runtimes=["cpu"])
    assert options.batch_sizes == (1, 4) and options.runtimes == ("cpu",)
    assert BenchOptions().runtimes is None and BenchOptions().batch_sizes == (8,)
    hash(options)  # frozen, and every field hashable


def test_accuracy_latency_figure(tmp_path):
    points = [
        {"name": "plain_fp32", "latency_ms": 4.0, "top1": 75.0},
        {"name": "pruned_fp32", "latency_ms": 2.5, "top1": 73.5},
        {"name": "pruned_int8", "latency_ms": 1.2, "top1": 73.0},
    ]
    fig = accuracy_latency_figure(points, "ORT CPU", 8)
    ax = fig.axes[0]
    offsets = [c.get_offsets().tolist() for c in ax.collections]  # one marker, and legend entry, per file
    assert offsets == [[[p["latency_ms"], p["top1"]]] for p in points]
    assert [t.get_text().split(":")[0] for t in ax.get_legend().get_texts()][:3] == [p["name"] for p in points]
    assert "ORT CPU, batch 8" in ax.get_xlabel() and "top-1" in ax.get_ylabel()
    path = save_figure(fig, tmp_path / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
