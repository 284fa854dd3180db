"""One timed call per runtime: ONNX Runtime on a host array or through IOBinding on device-resident tensors,
OpenVINO's CPU device, PyTorch eager; each `*_step` prepares its input once and returns the call to time."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from compress.export import INPUT_NAME, OUTPUT_NAME, onnx_session

if TYPE_CHECKING:
    import openvino


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


def import_openvino():
    """The `openvino` module, or None where it is not installed."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino


def openvino_unavailable() -> str | None:
    """Why OpenVINO cannot run here (one line), or None when its CPU device can."""
    ov = import_openvino()
    if ov is None:
        return "the openvino package is not installed (pip install openvino)"
    if "CPU" not in ov.Core().available_devices:
        return "OpenVINO has no CPU device here"
    return None


def openvino_model(path: str | Path, threads: int | None = None) -> openvino.CompiledModel:
    """The ONNX file `path` compiled by OpenVINO for its CPU device, with the LATENCY hint, FP32 inference precision
    (INT8 QDQ graphs still run INT8 kernels) and `threads` inference threads (None: every core). Raises
    ModuleNotFoundError where openvino is not installed."""
    ov = import_openvino()
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
    ov = import_openvino()
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


def onnx_timing(provider: str) -> str:
    """What one timed call of `onnx_runner` covers on `provider`."""
    if provider == "openvino":
        return TIMING_OPENVINO
    return TIMING_IOBINDING if provider in IOBINDING_DEVICE else TIMING_HOST


def onnx_runner(path: str | Path, provider: str, threads: int | None) -> Callable[[np.ndarray], Callable[[], object]]:
    """Start an ONNX file on `provider` (an ORT provider, or 'openvino'): returns `prepare(batch) -> step`, `step()`
    being one timed call (through IOBinding on the providers of IOBINDING_DEVICE, on a host array otherwise). The
    session or compiled model lives exactly as long as `prepare`."""
    if provider == "openvino":
        compiled = openvino_model(path, threads)

        def prepare(x: np.ndarray):
            return openvino_step(compiled, x)

        prepare.compiled = compiled
        return prepare
    session = onnx_session(path, provider, threads)
    device = IOBINDING_DEVICE.get(provider)

    def prepare(x: np.ndarray):
        if device is not None:
            return iobinding_step(session, x, device)
        return lambda: session.run(None, {INPUT_NAME: x})

    prepare.session = session
    return prepare
