"""PyTorch eager: an nn.Module run as it is, on the caller's device; on CUDA each timed call ends with a device
synchronize (kernels are asynchronous)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from .base import Device, ModelSource, Step


class TorchSession:
    """A copy of a model, in eval mode on `device`."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.timing = f"torch eager, input on {device}" + (", synchronized" if device.type == "cuda" else "")

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The logits of the host batch `x`, as a host float32 array."""
        with torch.inference_mode():
            return self.model(torch.from_numpy(x).to(self.device)).float().cpu().numpy()

    def step(self, x: np.ndarray) -> Step:
        """One eager forward on `x`, moved to the device once, now; on CUDA each call waits for its kernels."""
        model, device, batch = self.model, self.device, torch.from_numpy(x).to(self.device)

        def step():
            with torch.inference_mode():
                out = model(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return out

        return step


class TorchEager:
    """PyTorch eager on the caller's device. Its threads are the process's: the caller sets them
    (`torch.set_num_threads`), for every torch model alike."""

    name, label, opens = "torch", "PyTorch", "torch"

    def unavailable(self, device: Device = "cpu", sample: ModelSource | None = None) -> str | None:
        """Why `device` cannot run torch here: a CUDA device asked for where there is none."""
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            return "torch_device is cuda, and CUDA is not available here"
        return None

    def version(self) -> str:
        return f"torch {torch.__version__}"

    def open(self, model: ModelSource, threads: int | None = None, device: Device = "cpu") -> TorchSession:
        """A copy of the nn.Module `model`, in eval mode on `device` (the caller's model is left alone)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"runtime 'torch' runs an nn.Module, not {type(model).__name__} {model}")
        device = torch.device(device)
        return TorchSession(copy.deepcopy(model).to(device).eval(), device)
