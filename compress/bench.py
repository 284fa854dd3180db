"""Latency benchmark of exported ONNX artifacts (ONNX Runtime, and OpenVINO on CPU when installed) and PyTorch eager
models, and the accuracy-latency figure.

Measurement rules, so that two artifacts are compared fairly on a shared machine:
- one ORT session (or OpenVINO compiled model, or torch model) is alive at a time: created, warmed up, timed, then
  deleted;
- artifacts are alternated round-robin over `cfg.rounds` rounds (the starting artifact rotates each round),
  so slow drifts of the machine (thermal, other jobs) hit every artifact alike;
- each round gives one median per (artifact, provider, batch); the reported median is the median over rounds,
  p90 is over every timed batch of every round;
- `ratios` are latency ratios artifact / reference (below 1: faster than the reference), computed within each
  round and then reduced to their median over rounds.

What one timed call covers (each result's `timing` says which): on the CPU provider, `session.run` on a host
array; on CUDA and TensorRT, `run_with_iobinding` with the input copied to the GPU once, before timing, and the
output bound on the GPU, so host<->device copies are not timed; on OpenVINO (provider 'openvino', the `openvino`
package's CPU device, not an ORT execution provider), a synchronous `infer()` of one infer request whose input
tensor shares the host array, set once, the model compiled with the LATENCY hint at FP32 inference precision; a
torch model runs eagerly on `torch_device`, its input moved there once, and on CUDA each call ends with a device
synchronize (kernels are asynchronous).
"""

from __future__ import annotations

import copy
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from compress.export import INPUT_NAME, OUTPUT_NAME, available_providers, onnx_session
from compress.io import atomic_path
from compress.recipe import BenchCfg

if TYPE_CHECKING:
    import openvino


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int | None, providers: list[str]) -> dict:
    """The machine and library versions a benchmark ran with (OpenVINO's when `providers` has 'openvino')."""
    import onnxruntime as ort

    info = {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "threads": threads,
        "providers": providers,
        "ort_available_providers": ort.get_available_providers(),
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if "openvino" in providers:
        info["openvino"] = _openvino().__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def time_runs(step: Callable[[], object], warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of `iters` calls of `step`, after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


# ORT providers timed through IOBinding, and the ORT device their inputs and outputs live on
IOBINDING_DEVICE = {"cuda": "cuda", "tensorrt": "cuda"}
TIMING_HOST = "session.run, host input/output"
TIMING_IOBINDING = "iobinding, device-resident input/output"
TIMING_OPENVINO = "openvino LATENCY hint, f32 inference precision, infer request, host input"
# The CPU plugin defaults to BF16 where the CPU has AVX512_BF16 or AMX: an FP32 artifact would then be timed (and
# evaluated) at lower precision than its name says, and its INT8 twin's speed-up understated.
OPENVINO_CONFIG = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}


def _openvino():
    """The `openvino` module, or None where it is not installed."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino


def openvino_unavailable() -> str | None:
    """Why OpenVINO cannot run here (one line), or None when its CPU device can."""
    ov = _openvino()
    if ov is None:
        return "the openvino package is not installed (pip install openvino)"
    if "CPU" not in ov.Core().available_devices:
        return "OpenVINO has no CPU device here"
    return None


def openvino_model(path: str | Path, threads: int | None = None) -> openvino.CompiledModel:
    """The ONNX file `path` compiled by OpenVINO for its CPU device, with the LATENCY hint, FP32 inference precision
    (INT8 QDQ graphs still run INT8 kernels) and `threads` inference threads (None: every core). Raises
    ModuleNotFoundError where openvino is not installed."""
    ov = _openvino()
    if ov is None:
        raise ModuleNotFoundError("openvino is not installed: pip install openvino")
    core = ov.Core()
    config = dict(OPENVINO_CONFIG)
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return core.compile_model(core.read_model(str(path)), "CPU", config)


def openvino_logits(model: openvino.CompiledModel, images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Logits of `images` (N, 3, H, W) from a compiled model of `openvino_model`, as a float32 array (N, classes)."""
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else images
    outputs = model.create_infer_request().infer({INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})
    return outputs[model.output(OUTPUT_NAME)]


def openvino_step(model: openvino.CompiledModel, batch: np.ndarray) -> Callable[[], object]:
    """One synchronous run of the compiled `model` on `batch`: one infer request, its input tensor sharing `batch`'s
    memory, set once, now; each call returns the output tensor, owned by the request."""
    ov = _openvino()
    request = model.create_infer_request()
    x = np.ascontiguousarray(batch)  # its own dtype: INT8 layer models read uint8
    request.set_input_tensor(ov.Tensor(x, shared_memory=True))

    def step():
        request.infer()
        return request.get_output_tensor()

    step.input = x  # the memory the input tensor shares
    step.request = request  # the request (and through it the compiled model) lives as long as `step`
    return step


def iobinding_step(session, batch: np.ndarray, device: str) -> Callable[[], object]:
    """One synchronized run of `session` on `batch`, with input and output resident on the ORT `device` ('cuda',
    or 'cpu'): the input is copied there once, now; each call returns the output OrtValue, left on the device."""
    import onnxruntime as ort

    binding = session.io_binding()
    value = ort.OrtValue.ortvalue_from_numpy(batch, device, 0)
    binding.bind_ortvalue_input(INPUT_NAME, value)
    binding.bind_output(OUTPUT_NAME, device, 0)  # ORT allocates it on the device, no copy back to the host
    binding.synchronize_inputs()

    def step():
        session.run_with_iobinding(binding)  # ORT synchronizes the device at the end of a run, by default
        binding.synchronize_outputs()
        return binding.get_outputs()[0]

    step.input = value  # the device copy lives as long as `step`
    return step


def torch_step(model: nn.Module, batch: np.ndarray, device: torch.device) -> Callable[[], object]:
    """One eager forward of `model` (already on `device`) on `batch`, moved to `device` once, now; on CUDA each
    call waits for its kernels to finish."""
    x = torch.from_numpy(batch).to(device)

    def step():
        with torch.inference_mode():
            out = model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return step


class _Job:
    """One thing to time: an ONNX artifact on an ORT provider or on OpenVINO, or a torch model run eagerly on
    `device`."""

    def __init__(
        self,
        name: str,
        provider: str,
        path: Path | None = None,
        model: nn.Module | None = None,
        device: torch.device | None = None,
    ):
        self.name, self.provider, self.path, self.model, self.device = name, provider, path, model, device

    @property
    def timing(self) -> str:
        if self.model is not None:
            sync = ", synchronized" if self.device.type == "cuda" else ""
            return f"torch eager, input on {self.device}{sync}"
        if self.provider == "openvino":
            return TIMING_OPENVINO
        return TIMING_IOBINDING if self.provider in IOBINDING_DEVICE else TIMING_HOST

    def open(self, threads: int | None) -> Callable[[np.ndarray], Callable[[], object]]:
        """Start the ORT session or compile the OpenVINO model, if any: returns `prepare(batch) -> step`, `step()`
        being one timed call."""
        if self.provider == "openvino":
            compiled = openvino_model(self.path, threads)

            def prepare(x: np.ndarray):
                return openvino_step(compiled, x)

            prepare.compiled = compiled  # keeps the compiled model alive exactly as long as `prepare`
            return prepare
        if self.model is None:
            session = onnx_session(self.path, self.provider, threads)
            device = IOBINDING_DEVICE.get(self.provider)

            def prepare(x: np.ndarray):
                if device is not None:
                    return iobinding_step(session, x, device)
                return lambda: session.run([OUTPUT_NAME], {INPUT_NAME: x})

            prepare.session = session  # keeps the session alive exactly as long as `prepare`
            return prepare
        return lambda x: torch_step(self.model, x, self.device)


def _resolve_providers(
    cfg: BenchCfg, artifacts: dict[str, Path], torch_models: dict, threads: int | None, torch_device: torch.device
) -> tuple[list[str], dict[str, str]]:
    """The providers to time, and {provider: why skipped} for those asked for that cannot run here. A GPU
    provider is tried once on the first artifact: ORT lists CUDA/TensorRT whenever it was built with them.
    With `cfg.providers` None, OpenVINO is in only where it can run."""
    here = available_providers()
    if cfg.providers is None:
        wanted = list(here) + ([] if openvino_unavailable() else ["openvino"]) + (["torch"] if torch_models else [])
    else:
        wanted = list(dict.fromkeys(cfg.providers))
    providers, skipped = [], {}
    for p in wanted:
        if p == "torch" and torch_device.type == "cuda" and not torch.cuda.is_available():
            skipped[p] = "torch_device is cuda, and CUDA is not available here"
        elif p == "torch":
            providers.append(p)
        elif p == "openvino":
            why = openvino_unavailable()
            if why:
                skipped[p] = why
            else:
                providers.append(p)
        elif p not in here:
            skipped[p] = "not available here"
        elif p != "cpu" and artifacts:
            try:
                probe = onnx_session(next(iter(artifacts.values())), p, threads)
                del probe
                providers.append(p)
            except (ValueError, RuntimeError) as e:
                skipped[p] = str(e).splitlines()[0] if str(e) else type(e).__name__
        else:
            providers.append(p)
    return providers, skipped


def benchmark(
    artifacts: dict[str, Path],
    cfg: BenchCfg,
    image_size: int,
    torch_models: dict[str, nn.Module] | None = None,
    reference: str | None = None,
    torch_device: str | torch.device = "cpu",
) -> dict:
    """Latency of each ONNX artifact on each ORT provider asked for in `cfg.providers` and available here (CPU
    always) and on OpenVINO's CPU device (provider 'openvino', where the package is installed), and of each torch
    model (provider 'torch', eager on `torch_device`), for every batch size of `cfg.batch_sizes`. What a timed call
    covers is in each result's `timing` (see the module's docstring).

    `reference` names the artifact the ratios divide by (default: the first artifact, else the first torch model).
    Returns {"results": [{artifact, provider, batch, median_ms, p90_ms, images_per_s, round_medians_ms, timing}],
    "ratios": {"<name>/<reference>": median ratio at the main batch on CPU (else the first provider); others get
    an "@provider" suffix}, "ratio_details": [...], "machine": {..., "skipped_providers": {provider: why}}}.
    A provider asked for but unable to run here is skipped (and said so in machine.skipped_providers), not an
    error; without GPU providers an ONNX session is always on CPU.
    """
    torch_models = dict(torch_models or {})
    torch_device = torch.device(torch_device)
    artifacts = {name: Path(p) for name, p in artifacts.items()}
    for name, p in artifacts.items():
        if not p.is_file():
            raise FileNotFoundError(f"benchmark: artifact '{name}' not found: {p}")
    providers, skipped = _resolve_providers(cfg, artifacts, torch_models, cfg.threads, torch_device)
    jobs: list[_Job] = []
    for provider in providers:
        if provider == "torch":
            jobs += [
                _Job(name, "torch", model=copy.deepcopy(m).to(torch_device).eval(), device=torch_device)
                for name, m in torch_models.items()
            ]
        else:
            jobs += [_Job(name, provider, path=p) for name, p in artifacts.items()]
    if not jobs:
        raise ValueError("benchmark: nothing to measure (no artifacts or torch models for the asked providers)")
    batch_sizes = list(dict.fromkeys(cfg.batch_sizes))
    main_batch = cfg.main_batch if cfg.main_batch is not None else batch_sizes[0]
    if main_batch not in batch_sizes:
        raise ValueError(f"bench.main_batch={main_batch} is not one of bench.batch_sizes={batch_sizes}")
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, 3, image_size, image_size), dtype=np.float32) for b in batch_sizes}

    torch_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    times: dict[tuple[str, str, int], list[list[float]]] = {}
    timing = {(job.name, job.provider): job.timing for job in jobs}
    try:
        for rnd in range(cfg.rounds):
            shift = rnd % len(jobs)
            for job in jobs[shift:] + jobs[:shift]:
                prepare = job.open(cfg.threads)
                for b in batch_sizes:
                    t = time_runs(prepare(inputs[b]), cfg.warmup, cfg.iters)
                    times.setdefault((job.name, job.provider, b), []).append(t)
                del prepare  # the only reference to the session: it is freed before the next one starts
                gc.collect()
    finally:
        torch.set_num_threads(torch_threads)

    results = []
    for (name, provider, b), rounds in times.items():
        med = statistics.median(statistics.median(r) for r in rounds)
        results.append(
            {
                "artifact": name,
                "provider": provider,
                "batch": b,
                "median_ms": med,
                "p90_ms": _percentile([t for r in rounds for t in r], 90),
                "images_per_s": b / (med / 1000.0),
                "round_medians_ms": [statistics.median(r) for r in rounds],
                "timing": timing[(name, provider)],
            }
        )
    ratios, details = _ratios(times, providers, batch_sizes, main_batch, artifacts, torch_models, reference)
    return {
        "results": results,
        "ratios": ratios,
        "ratio_details": details,
        "main_batch": main_batch,
        "machine": {**machine_info(cfg.threads, providers), "skipped_providers": skipped},
        "settings": {"warmup": cfg.warmup, "iters": cfg.iters, "rounds": cfg.rounds, "image_size": image_size},
    }


def _ratios(times, providers, batch_sizes, main_batch, artifacts, torch_models, reference):
    ratios, details = {}, []
    primary = "cpu" if "cpu" in providers else providers[0]
    for provider in providers:
        names = list(torch_models) if provider == "torch" else list(artifacts)
        ref = reference if reference in names else (names[0] if names else None)
        if ref is None:
            continue
        for b in batch_sizes:
            ref_rounds = [statistics.median(r) for r in times[(ref, provider, b)]]
            for name in names:
                if name == ref:
                    continue
                per_round = [
                    statistics.median(r) / rt for r, rt in zip(times[(name, provider, b)], ref_rounds, strict=True)
                ]
                value = statistics.median(per_round)
                details.append(
                    {
                        "ratio": f"{name}/{ref}",
                        "provider": provider,
                        "batch": b,
                        "per_round": per_round,
                        "median": value,
                    }
                )
                if b == main_batch:
                    ratios[f"{name}/{ref}" + ("" if provider == primary else f"@{provider}")] = value
    return ratios, details


def accuracy_latency_figure(points: list[dict], title: str = "Accuracy vs latency"):
    """Top-1 against median latency, one labelled point per artifact (dicts with name, latency_ms, top1); the
    dashed line joins the Pareto front (no other point is both faster and more accurate)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=100)
    FigureCanvasAgg(fig)  # Agg canvas: no display or pyplot state needed
    ax = fig.add_subplot(1, 1, 1)
    if points:
        xs = [float(p["latency_ms"]) for p in points]
        ys = [float(p["top1"]) for p in points]
        ax.scatter(xs, ys, zorder=3)
        for p, x, y in zip(points, xs, ys):
            ax.annotate(str(p["name"]), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        front, best = [], -float("inf")
        for x, y in sorted(zip(xs, ys), key=lambda xy: (xy[0], -xy[1])):
            if y > best:
                front.append((x, y))
                best = y
        if len(front) > 1:
            ax.plot(*zip(*front), linestyle="--", linewidth=1, alpha=0.6, zorder=2)
    ax.set_xlabel("median latency (ms)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """Write a figure atomically; the format comes from the suffix (.png, .svg, .pdf)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    return path
