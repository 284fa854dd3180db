"""Deployment targets of INT8 models, in the spirit of NNCF's target device: what the INT8 kernels of the machine a
model will run on can do, and what quantization that calls for.

On x86 CPUs without VNNI, ONNX Runtime's u8s8 INT8 kernels multiply with AVX2's `pmaddubsw`, which adds pairs of
u8 x s8 products into int16 and saturates when weights use the full 8-bit range: there NNCF's overflow fix (weights
on 7 bits) keeps the runtime's results equal to the fake-quant model. VNNI (AVX-512 or AVX), AMX and GPUs
accumulate in int32 and lose nothing to full-range weights, so the fix only costs them precision.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from .runtime import cpu_flags

TARGET_DEVICES = ("cpu-vnni", "cpu-avx2", "gpu")
INT32_ACCUMULATING_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # any of them: no int16 saturation
METADATA_KEY = "repvgg_compress.target_device"  # where an exported file records its target
# the runtime each target deploys on, where target-specific choices are timed (`export.stem: auto`)
TARGET_RUNTIMES = {"cpu-vnni": "cpu", "cpu-avx2": "cpu", "gpu": "tensorrt"}


def cpu_target(flags: list[str] | None = None) -> str:
    """The CPU target of a machine with these CPU `flags` (default: this one's): cpu-vnni or cpu-avx2."""
    flags = cpu_flags() if flags is None else flags
    return "cpu-vnni" if any(f in flags for f in INT32_ACCUMULATING_FLAGS) else "cpu-avx2"


def resolve_target(target: str, device_type: str, flags: list[str] | None = None) -> str:
    """`target` made explicit: "auto" is this machine (gpu where the run is on CUDA, else its CPU's target)."""
    if target != "auto":
        return target
    return "gpu" if device_type == "cuda" else cpu_target(flags)


def overflow_fix_for(target: str) -> str:
    """NNCF's overflow fix that `target` needs: "enable" (7-bit weights) for CPUs without VNNI, else "disable"."""
    return "enable" if target == "cpu-avx2" else "disable"


def file_target(path: str | Path) -> str | None:
    """The deployment target an exported INT8 file records in its metadata, or None (an FP32 file, or older)."""
    props = onnx.load(str(path), load_external_data=False).metadata_props
    return next((p.value for p in props if p.key == METADATA_KEY), None)


def target_warning(target: str | None, what: str, flags: list[str] | None = None) -> str | None:
    """A one-line warning when `what` (an INT8 file, named), made for `target`, runs on this CPU (its `flags`,
    default this one's) and this CPU lacks what the target assumed (full 8-bit weights on a CPU without VNNI); None
    when it fits, or the target is unknown."""
    if target in ("cpu-vnni", "gpu") and cpu_target(flags) == "cpu-avx2":
        return (f"warning: {what} was quantized for {target} (full 8-bit weights), but this CPU has no VNNI: its "
                f"INT8 kernels may saturate and differ from the fake-quant model; quantize with "
                f"quantize.target_device: cpu-avx2 to deploy here")
    return None


def isa_warning(path: str | Path, flags: list[str] | None = None) -> str | None:
    """`target_warning` for the INT8 file `path`, with the target its metadata records."""
    return target_warning(file_target(path), str(path), flags)
