"""The machine and library versions a benchmark ran with: every latency figure names them."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from .runtimes import import_openvino


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
        info["openvino"] = import_openvino().__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
