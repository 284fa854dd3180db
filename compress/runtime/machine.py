"""The machine and library versions a measurement ran with: every latency figure, and every latency table's cache
key, names them."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def _cpuinfo(field: str) -> str | None:
    """The value of the first `field` line of /proc/cpuinfo, or None (no such line, or no /proc)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU's feature flags (e.g. avx512_vnni), sorted; empty where /proc/cpuinfo does not list them."""
    return sorted((_cpuinfo("flags") or "").split())


ISA = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")  # what x86 CPU kernels (FP32, INT8) pick from


def isa_flags(flags: list[str] | None = None) -> list[str]:
    """Which of ISA the CPU has (from `flags`, default this CPU's): what every INT8 or latency figure depends on."""
    flags = cpu_flags() if flags is None else flags
    return [f for f in ISA if f in flags]


def machine_info(threads: int | None, runtimes: list[str]) -> dict:
    """The machine and library versions a benchmark of `runtimes` ran with (OpenVINO's when they have 'openvino')."""
    import onnxruntime as ort

    info = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "threads": threads,
        "providers": runtimes,
        "ort_available_providers": ort.get_available_providers(),
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if "openvino" in runtimes:
        import openvino

        info["openvino"] = openvino.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
