"""What every runtime offers (`Runtime`), what an opened model offers (`Session`), the ONNX files' input and output
names. Timing them is `compress.timing`'s."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from torch import nn

from compress.timing import Step  # what `Session.step` makes: one call the engine times

# the ONNX contract: export writes these names and at least this opset; every ONNX runtime feeds and reads them
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MIN_OPSET = 17

ModelSource = str | Path | nn.Module  # what `Runtime.open` takes: an ONNX file's path, or a torch model
Device = str | torch.device


class Session(Protocol):
    """A model opened by a runtime: alive as long as this object (and the steps it made) are."""

    timing: str  # what one call of `step(...)` covers, as each benchmark result says it

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The model's output for the batch `x` (N, C, H, W), as a host float32 array (N, classes)."""
        ...

    def step(self, x: np.ndarray) -> Step:
        """One timed call on the batch `x` (its own dtype: INT8 layer models read uint8), the input prepared once,
        now (copied to the device, bound), so that the call times the model's run alone."""
        ...


class Runtime(Protocol):
    """A way to run a model: ONNX Runtime on one execution provider, OpenVINO, PyTorch eager. One instance per line
    of `compress.runtime.RUNTIMES`."""

    name: str  # its key in RUNTIMES, and the `provider` of its benchmark results
    label: str  # its column name in the report, e.g. "ORT CPU"
    opens: Literal["onnx", "torch"]  # what `open` takes: an ONNX file's path, or an nn.Module

    def unavailable(self, device: Device = "cpu", sample: ModelSource | None = None) -> str | None:
        """Why this runtime cannot run here (one line), or None when it can. `device` is where a runtime that runs
        on the caller's device (torch eager) would run; the others run on their own. `sample`, a model it will
        open, lets a runtime whose library lists a device it may fail to start (ORT's CUDA and TensorRT) try it."""
        ...

    def version(self) -> str:
        """The library and its version, e.g. "onnxruntime 1.20.1"."""
        ...

    def open(self, model: ModelSource, threads: int | None = None, device: Device = "cpu") -> Session:
        """Start `model` with `threads` intra-op threads (None: the library's default, every core) on `device`
        (see `unavailable`). A runtime that cannot run here raises, never falls back to another."""
        ...
