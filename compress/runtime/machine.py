"""The machine and library versions a measurement ran with: every latency figure, and every latency table's cache
key, names them."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo(field: str) -> str | None:
    """The value of the first `field` line of /proc/cpuinfo ("model" is not "model name"), or None (no such line,
    or no /proc)."""
    try:
        for line in CPUINFO.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() == field:
                return value.strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU's feature flags (e.g. avx512_vnni), sorted; empty where /proc/cpuinfo does not list them."""
    return sorted((_cpuinfo("flags") or "").split())


# what x86 CPU kernels pick from: FP32 and INT8 (inference, latency tables), BF16 (training, `compress.train_device`)
ISA = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "amx_bf16")


def isa_flags(flags: list[str] | None = None) -> list[str]:
    """Which of ISA the CPU has (from `flags`, default this CPU's): what every INT8, latency or training-speed figure
    depends on."""
    flags = cpu_flags() if flags is None else flags
    return [f for f in ISA if f in flags]


def describe_cpu(machine: dict | None = None) -> str:
    """The CPU as a figure names it: model name, family and model numbers where /proc/cpuinfo has them (a VM's
    "AMD EPYC" is a Zen 4 at family 25, a Zen 5 at 26) and the ISA flags its kernels pick from. `machine`: a
    `machine_info` dict (an older one without the numbers or flags gives what it has); default this machine."""
    machine = cpu_info() if machine is None else machine
    ids = (f"family {machine['cpu_family']} model {machine['cpu_model_number']}"
           if machine.get("cpu_family") and machine.get("cpu_model_number") else None)
    isa = machine.get("isa")
    flags = None if isa is None else ", ".join(isa) or "no AVX2"
    details = "; ".join(x for x in (ids, flags) if x)
    return f"{machine.get('cpu')} ({details})" if details else str(machine.get("cpu"))


def cpu_info() -> dict:
    """This CPU's part of `machine_info`: its model name, family and model numbers, and ISA flags."""
    return {"cpu": cpu_model(), "cpu_family": _cpuinfo("cpu family"), "cpu_model_number": _cpuinfo("model"),
            "isa": isa_flags()}


def machine_info(threads: int | None, runtimes: list[str]) -> dict:
    """The machine and library versions a benchmark of `runtimes` ran with (OpenVINO's when they have 'openvino')."""
    import onnxruntime as ort

    info = {
        **cpu_info(),
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
