"""The runtimes a model runs and is timed on, behind one protocol (`base.Runtime`): ONNX Runtime on its CPU, CUDA and
TensorRT execution providers, OpenVINO's CPU device, PyTorch eager. Export evaluation, the benchmark and the
latency table all go through `RUNTIMES`; adding a runtime is one module and one line there.

Importing this package is cheap: onnxruntime and openvino are imported when a runtime is used."""

from __future__ import annotations

from pathlib import Path

from .base import INPUT_NAME, MIN_OPSET, OUTPUT_NAME, Runtime, Session, Step
from .machine import cpu_flags, cpu_model, describe_cpu, isa_flags, machine_info
from .onnxruntime_ep import OrtRuntime
from .openvino_cpu import OpenVinoCpu
from .torch_eager import TorchEager

# by name, in the order a benchmark of every runtime times them
RUNTIMES: dict[str, Runtime] = {runtime.name: runtime for runtime in (
    OrtRuntime("cpu", "ORT CPU", ("CPUExecutionProvider",)),
    OrtRuntime("cuda", "ORT CUDA", ("CUDAExecutionProvider", "CPUExecutionProvider"), iobinding_device="cuda"),
    OrtRuntime("tensorrt", "ORT TensorRT", ("TensorrtExecutionProvider", "CUDAExecutionProvider",
                                            "CPUExecutionProvider"), iobinding_device="cuda"),
    OpenVinoCpu(),
    TorchEager(),
)}


def get_runtime(name: str) -> Runtime:
    """The runtime called `name` in RUNTIMES; a one-line ValueError naming the valid ones otherwise."""
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime '{name}'; valid: {', '.join(RUNTIMES)}")
    return RUNTIMES[name]


def open_onnx(path: str | Path, runtime: str = "cpu", threads: int | None = None) -> Session:
    """The ONNX file `path` started on `runtime` (a name in RUNTIMES that runs ONNX files) with `threads` threads
    (None: the runtime's default)."""
    found = get_runtime(runtime)
    if found.opens != "onnx":
        onnx = [name for name, r in RUNTIMES.items() if r.opens == "onnx"]
        raise ValueError(f"runtime '{runtime}' does not run ONNX files; those that do: {', '.join(onnx)}")
    return found.open(path, threads)


__all__ = ["INPUT_NAME", "MIN_OPSET", "OUTPUT_NAME", "RUNTIMES", "Runtime", "Session", "Step", "cpu_flags", "cpu_model",
           "describe_cpu", "get_runtime", "isa_flags", "machine_info", "open_onnx"]
