"""ONNX Runtime on one execution provider (CPU, CUDA, TensorRT). On CPU a timed call is `session.run` on a host
array; on a GPU provider it runs through IOBinding, the input copied to the device once and the output left there,
so host<->device copies are not timed. A provider that cannot start is an error, never a silent fallback to CPU."""

from __future__ import annotations

import numpy as np
import torch

from .base import INPUT_NAME, OUTPUT_NAME, Device, ModelSource, Step

TIMING_HOST = "session.run, host input/output"
TIMING_IOBINDING = "iobinding, device-resident input/output"


def _iobinding_step(session, batch: np.ndarray, device: str) -> Step:
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


class OrtSession:
    """An ONNX Runtime InferenceSession (`session`) and how its runs are timed."""

    def __init__(self, session, iobinding_device: str | None):
        self.session, self.iobinding_device = session, iobinding_device
        self.timing = TIMING_HOST if iobinding_device is None else TIMING_IOBINDING

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The logits of the host batch `x`, through `session.run` whatever the provider."""
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]

    def step(self, x: np.ndarray) -> Step:
        """One timed run on `x`: through IOBinding on `iobinding_device`, else `session.run` on the host array."""
        if self.iobinding_device is not None:
            return _iobinding_step(self.session, x, self.iobinding_device)
        session = self.session
        return lambda: session.run(None, {INPUT_NAME: x})


class OrtRuntime:
    """ONNX Runtime on the execution providers `providers`: the first one runs the model, the others only the nodes
    it cannot (TensorRT hands those to CUDA, a GPU provider to the CPU). `iobinding_device` is the ORT device a timed
    call's input and output are bound on ('cuda': a CUDA device is needed); None: host arrays through session.run."""

    opens = "onnx"

    def __init__(self, name: str, label: str, providers: tuple[str, ...], iobinding_device: str | None = None):
        self.name, self.label, self.providers, self.iobinding_device = name, label, providers, iobinding_device

    def unavailable(self, device: Device = "cpu", sample: ModelSource | None = None) -> str | None:
        """None where this provider runs here. ORT lists CUDA and TensorRT whenever it was built with them: a CUDA
        device is needed too, and TensorRT's libraries, which only starting a session on `sample` tells."""
        if not self._listed():
            return "not available here"
        if self.iobinding_device == "cuda" and sample is not None:
            try:
                self.open(sample)
            except (ValueError, RuntimeError) as e:
                return str(e).splitlines()[0] if str(e) else type(e).__name__
        return None

    def _listed(self) -> bool:
        """Whether ORT was built with this provider and, for a GPU one, a CUDA device is here."""
        import onnxruntime as ort

        gpu_missing = self.iobinding_device == "cuda" and not torch.cuda.is_available()
        return not gpu_missing and self.providers[0] in ort.get_available_providers()

    def version(self) -> str:
        import onnxruntime as ort

        return f"onnxruntime {ort.__version__}"

    def open(self, model: ModelSource, threads: int | None = None, device: Device = "cpu") -> OrtSession:
        """An InferenceSession on the ONNX file `model`, `threads` intra-op threads (None: ORT's default, all
        physical cores); `device` is not read (the provider decides). ValueError where the provider cannot run."""
        import onnxruntime as ort

        if not self._listed():
            raise ValueError(f"runtime '{self.name}' is not available here ({self.providers[0]} or its device missing)")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        session = ort.InferenceSession(str(model), sess_options=opts, providers=list(self.providers))
        if session.get_providers()[0] != self.providers[0]:
            raise ValueError(f"runtime '{self.name}' failed to start (ORT fell back to {session.get_providers()[0]})")
        return OrtSession(session, self.iobinding_device)
