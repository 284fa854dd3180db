"""The runtime table: a runtime registered in RUNTIMES (here, in the test only, a NumPy one that runs ONNX files of
one Flatten + Gemm) is timed by the benchmark, evaluates exported files and times the latency table's models, with
no other change; and the table's lookups fail in one line."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from compress.bench import BenchOptions, benchmark
from compress.evaluation import compare_with_model, evaluate_onnx
from compress.export import export_onnx
from compress.prune.timing import Timing, jobs, record
from compress.report import artifact_table
from compress.runtime import RUNTIMES, get_runtime, open_onnx
from compress.timing import LATENCY_TABLE, Counts, run_rounds

SIZE = 4
FEATURES, CLASSES = 3 * SIZE * SIZE, 10


class GemmSession:
    """An ONNX file of Flatten + Gemm, run as a NumPy matrix product."""

    timing = "numpy matmul, host input"

    def __init__(self, path: Path):
        graph = onnx.load(str(path)).graph
        weights = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        gemm = next(node for node in graph.node if node.op_type == "Gemm")
        trans_b = next((a.i for a in gemm.attribute if a.name == "transB"), 0)
        self.weight = weights[gemm.input[1]].T if trans_b else weights[gemm.input[1]]
        self.bias = weights[gemm.input[2]]

    def logits(self, x: np.ndarray) -> np.ndarray:
        return (x.reshape(len(x), -1) @ self.weight + self.bias).astype(np.float32)

    def step(self, x: np.ndarray):
        return lambda: self.logits(x)


class NumpyGemm:
    """The fake runtime: what it opened, in order, is in `opened`."""

    name, label, opens = "numpy", "NumPy", "onnx"

    def __init__(self):
        self.opened: list[str] = []

    def unavailable(self, device="cpu", sample=None):
        return None

    def version(self):
        return f"numpy {np.__version__}"

    def open(self, model, threads=None, device="cpu"):
        self.opened.append(Path(model).stem)
        return GemmSession(Path(model))


@pytest.fixture
def numpy_runtime(monkeypatch):
    runtime = NumpyGemm()
    monkeypatch.setitem(RUNTIMES, runtime.name, runtime)
    return runtime


def linear(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(FEATURES, CLASSES)).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[nn.Module, Path]]:
    d = tmp_path_factory.mktemp("gemm")
    models = {"wide": linear(0), "narrow": linear(1)}
    return {name: (m, export_onnx(m, d / f"{name}.onnx", torch.zeros(1, 3, SIZE, SIZE))) for name, m in models.items()}


def test_the_fake_runtime_computes_what_onnx_runtime_does(numpy_runtime, files):
    x = np.random.default_rng(0).standard_normal((5, 3, SIZE, SIZE), dtype=np.float32)
    _, path = files["wide"]
    np.testing.assert_allclose(open_onnx(path, "numpy").logits(x), open_onnx(path, "cpu").logits(x), atol=1e-5)


def test_bench_times_a_registered_runtime(numpy_runtime, files):
    artifacts = {name: path for name, (_, path) in files.items()}
    options = BenchOptions(batch_sizes=(1, 2), threads=1, warmup=1, iters=2, rounds=2, runtimes=("numpy", "cpu"))
    out = benchmark(artifacts, options, SIZE, reference="wide")
    rows = {(r["artifact"], r["provider"], r["batch"]): r for r in out["results"]}
    assert set(rows) == {(a, p, b) for a in artifacts for p in ("numpy", "cpu") for b in (1, 2)}
    assert {r["timing"] for r in rows.values() if r["provider"] == "numpy"} == {GemmSession.timing}
    assert all(r["median_ms"] > 0 and len(r["round_medians_ms"]) == 2 for r in rows.values())
    assert set(out["ratios"]) == {"narrow/wide", "narrow/wide@numpy"}
    assert out["machine"]["providers"] == ["numpy", "cpu"]
    # one session per (artifact, round), alternating over every job; four jobs over two rounds: the second round
    # starts two jobs later, at the CPU provider's, so NumPy's come last in it, in the same order
    assert numpy_runtime.opened == ["wide", "narrow", "wide", "narrow"]


def test_bench_of_every_runtime_includes_a_registered_one(numpy_runtime, files):
    _, path = files["wide"]
    out = benchmark({"wide": path}, BenchOptions(batch_sizes=(1,), warmup=0, iters=1, rounds=1), SIZE)
    assert out["machine"]["providers"][-1] == "numpy"  # after the built-in ones, in table order
    assert ("wide", "numpy") in {(r["artifact"], r["provider"]) for r in out["results"]}


def test_export_evaluation_runs_through_a_registered_runtime(numpy_runtime, files):
    model, path = files["wide"]
    images = torch.randn(32, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        labels = model(images).argmax(1)
    labels[:8] = (labels[:8] + 1) % CLASSES  # a quarter mislabelled: top-1 is 75%
    result = evaluate_onnx(path, [(images, labels)], runtime="numpy", reference=model)
    assert numpy_runtime.opened == ["wide"]
    assert result["top1"] == 75.0 and result["n"] == 32
    assert result["max_abs_diff"] < 1e-5 and result["max_abs_logit"] > 0
    np.testing.assert_allclose(result["logits"], evaluate_onnx(path, [(images, labels)])["logits"], atol=1e-5)
    assert compare_with_model(path, model, images, ["numpy"])["numpy"]["max_abs_diff"] < 1e-5
    assert numpy_runtime.opened == ["wide", "wide"]


def test_latency_timing_runs_through_a_registered_runtime(numpy_runtime, files, tmp_path):
    timings = [Timing(tmp_path / f"m{k}.onnx", onnx.load(str(files["wide"][1])), (2, 3, SIZE, SIZE), np.float32)
               for k in range(3)]
    timed = run_rounds(jobs(timings, "numpy", None, np.random.default_rng(0)),
                       Counts(LATENCY_TABLE.warmup, LATENCY_TABLE.iters, 2))
    record(timed)
    assert numpy_runtime.opened == ["m0", "m1", "m2", "m1", "m2", "m0"]  # alternating, one session at a time
    assert all(len(timed[t].calls) == 2 and t.ms == min(min(c) for c in timed[t].calls) for t in timings)


def test_the_report_names_a_registered_runtime_by_its_label(numpy_runtime):
    bench = {"main_batch": 1, "results": [{"artifact": "wide", "provider": "numpy", "batch": 1, "fastest_ms": 2.0,
                                           "median_ms": 3.0}]}
    header, _, row = artifact_table({"wide": {"size_bytes": 10**6}}, bench)
    assert "| NumPy fastest call ms @1 | x vs plain_fp32 (NumPy) |" in header
    assert row.startswith("| wide |") and "| 2.00 |" in row


def test_the_report_marks_each_files_fastest_runtime(numpy_runtime):
    results = [{"artifact": a, "provider": p, "batch": 8, "fastest_ms": ms, "median_ms": 100 - ms}
               for a, p, ms in (("plain_int8", "cpu", 8.1), ("plain_int8", "numpy", 6.2),
                                ("plain_fp32", "cpu", 30.0), ("plain_fp32", "numpy", 41.0))]
    rows = artifact_table({a: {"size_bytes": 10**6} for a in ("plain_fp32", "plain_int8")},
                          {"main_batch": 8, "results": results})
    assert rows[0].endswith("| fastest runtime |")  # by the fastest call, not the median
    assert rows[2].startswith("| plain_fp32 |") and rows[2].endswith("| ORT CPU |")
    assert rows[3].startswith("| plain_int8 |") and rows[3].endswith("| NumPy |")


def test_a_figure_names_the_cpu_with_its_family_model_and_isa(tmp_path, monkeypatch):
    from compress.runtime import describe_cpu, machine, machine_info

    cpuinfo = tmp_path / "cpuinfo"
    # /proc/cpuinfo lists "model" before "model name": each must be read by its own key
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
                       "model name\t: AMD EPYC\nflags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16\n")
    monkeypatch.setattr(machine, "CPUINFO", cpuinfo)
    assert describe_cpu() == "AMD EPYC (family 26 model 2; avx2, avx512f, avx512_vnni, avx512_bf16)"
    info = machine_info(2, ["cpu"])
    assert (info["cpu"], info["cpu_family"], info["cpu_model_number"]) == ("AMD EPYC", "26", "2")
    assert describe_cpu(info) == describe_cpu()
    # a summary written before these keys, and a CPU without the listed ISA
    assert describe_cpu({"cpu": "AMD EPYC", "threads": 2}) == "AMD EPYC"
    assert describe_cpu({"cpu": "Generic", "isa": []}) == "Generic (no AVX2)"


def test_get_runtime_names_the_valid_ones_in_one_line(numpy_runtime):
    assert get_runtime("numpy") is numpy_runtime
    with pytest.raises(ValueError, match=r"^unknown runtime 'ort'; valid: cpu, cuda, tensorrt, openvino, torch, numpy$"):
        get_runtime("ort")


def test_onnx_files_only_open_on_runtimes_that_run_them(files):
    _, path = files["wide"]
    with pytest.raises(ValueError, match=r"^runtime 'torch' does not run ONNX files; those that do: cpu, cuda, "
                                         r"tensorrt, openvino$"):
        open_onnx(path, "torch")
    with pytest.raises(ValueError, match="^unknown runtime 'gpu'"):
        evaluate_onnx(path, [(torch.zeros(1, 3, SIZE, SIZE), torch.zeros(1, dtype=torch.long))], runtime="gpu")


def test_every_runtime_says_what_it_is():
    assert list(RUNTIMES) == ["cpu", "cuda", "tensorrt", "openvino", "torch"]
    assert {name: r.label for name, r in RUNTIMES.items()} == {
        "cpu": "ORT CPU", "cuda": "ORT CUDA", "tensorrt": "ORT TensorRT", "openvino": "OpenVINO", "torch": "PyTorch"}
    assert all(r.name == name for name, r in RUNTIMES.items())
    assert RUNTIMES["cpu"].unavailable() is None and RUNTIMES["cpu"].version().startswith("onnxruntime ")
    assert RUNTIMES["torch"].version() == f"torch {torch.__version__}"


def test_the_recipe_accepts_a_registered_runtime_by_name(numpy_runtime):
    from compress.recipe import RecipeError, validate_recipe

    recipe = validate_recipe({"name": "r", "model": {"name": "RepVGG-A0"}, "bench": {"providers": ["cpu", "numpy"]},
                              "prune": {"keep_latency": 0.5, "latency": {"provider": "numpy"}}})
    assert recipe.bench.providers == ["cpu", "numpy"] and recipe.prune.latency.provider == "numpy"
    with pytest.raises(RecipeError, match=r"recipe key 'prune.latency.provider': unknown runtime of ONNX files "
                                          r"'torch'; valid: auto, cpu, cuda, tensorrt, openvino, numpy"):
        validate_recipe({"name": "r", "model": {"name": "RepVGG-A0"}, "prune": {"latency": {"provider": "torch"}}})
