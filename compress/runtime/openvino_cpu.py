"""OpenVINO's CPU device (the `openvino` package, not an ONNX Runtime execution provider): the ONNX file compiled
with the LATENCY hint at FP32 inference precision; a timed call is a synchronous `infer()` of one infer request
whose input tensor shares the host array, set once."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .base import INPUT_NAME, OUTPUT_NAME, Device, ModelSource, Step

if TYPE_CHECKING:
    import openvino

TIMING_OPENVINO = "openvino LATENCY hint, f32 inference precision, infer request, host input"
# The CPU plugin defaults to BF16 where the CPU has AVX512_BF16 or AMX: an FP32 artifact would then be timed (and
# evaluated) at lower precision than its name says, and its INT8 twin's speed-up understated.
OPENVINO_CONFIG = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}


def _import_openvino():
    """The `openvino` module, or None where it is not installed."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino


class OpenVinoSession:
    """A model compiled by OpenVINO for its CPU device (`compiled`)."""

    timing = TIMING_OPENVINO

    def __init__(self, compiled: openvino.CompiledModel):
        self.compiled = compiled

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The logits of the batch `x` (N, 3, H, W), as a float32 array (N, classes)."""
        outputs = self.compiled.create_infer_request().infer({INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})
        return outputs[self.compiled.output(OUTPUT_NAME)]

    def step(self, x: np.ndarray) -> Step:
        """One synchronous run on `x`: one infer request, its input tensor sharing `x`'s memory, set once, now;
        each call returns the output tensor, owned by the request."""
        ov = _import_openvino()
        request = self.compiled.create_infer_request()
        batch = np.ascontiguousarray(x)  # its own dtype: INT8 layer models read uint8
        request.set_input_tensor(ov.Tensor(batch, shared_memory=True))

        def step():
            request.infer()
            return request.get_output_tensor()

        step.input = batch  # the memory the input tensor shares
        step.request = request  # the request (and through it the compiled model) lives as long as `step`
        return step


class OpenVinoCpu:
    """OpenVINO's CPU device, where the package is installed."""

    name, label, opens = "openvino", "OpenVINO", "onnx"

    def unavailable(self, device: Device = "cpu", sample: ModelSource | None = None) -> str | None:
        """Why OpenVINO cannot run here (one line), or None when its CPU device can."""
        ov = _import_openvino()
        if ov is None:
            return "the openvino package is not installed (pip install openvino)"
        if "CPU" not in ov.Core().available_devices:
            return "OpenVINO has no CPU device here"
        return None

    def version(self) -> str:
        return f"openvino {_import_openvino().__version__}"

    def open(self, model: ModelSource, threads: int | None = None, device: Device = "cpu") -> OpenVinoSession:
        """The ONNX file `model` compiled for OpenVINO's CPU device, with the LATENCY hint, FP32 inference precision
        (INT8 QDQ graphs still run INT8 kernels) and `threads` inference threads (None: every core). Raises
        ModuleNotFoundError where openvino is not installed."""
        ov = _import_openvino()
        if ov is None:
            raise ModuleNotFoundError("openvino is not installed: pip install openvino")
        core = ov.Core()
        config = dict(OPENVINO_CONFIG)
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        return OpenVinoSession(core.compile_model(core.read_model(str(model)), "CPU", config))
