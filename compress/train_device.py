"""How a training runs on its device: numeric precision, memory layout and compilation.

Each `auto` is resolved from facts of the device (CPU flags, CUDA capability), never from a timing taken at run
time, at the door (`Recipe.resolved`), so a run's keys name what ran.

- Precision. `auto` is BF16 autocast where the hardware multiplies BF16 natively: CPUs with AVX512-BF16 or AMX
  (oneDNN's BF16 convolutions; not for a model with a stride-2 conv on a 1x1 map, `cpu_bf16_hazard`), and CUDA
  devices that support BF16 (Ampere and later). Other CUDA devices get FP16 autocast with a GradScaler (FP16's
  narrow exponent needs loss scaling; BF16's does not). Other CPUs train in FP32: without those instructions oneDNN
  emulates BF16, slower than FP32. docs/results/train_throughput.md has the figures.
- Layout. `auto` is channels-last on CUDA (cuDNN's tensor-core kernels are NHWC) and on x86 CPUs with AVX-512
  (oneDNN's blocked NHWC kernels); elsewhere (AVX2-only x86, ARM) torch's default layout, unmeasured for training.
- QAT's `auto` is FP32 (`QAT_AUTO_PRECISION`).
- Compilation (`torch.compile`) is opt-in: it costs a compilation at every start of a training and needs a C++
  compiler on CPU (Triton on CUDA); where that is missing it is off, with one warning.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

import torch

from .runtime import cpu_flags

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # native BF16 dot products: oneDNN's BF16 convolutions pay
CPU_CHANNELS_LAST_FLAGS = ("avx512f",)  # oneDNN's NHWC convolution kernels for training
# QAT's `auto`: under autocast NNCF's activation quantizers take the previous layer's BF16/FP16 output and compute
# x / scale and its rounding in that type (8 bits of mantissa for BF16: up to half an INT8 step off at the top of the
# range), so QAT would train against a grid the exported INT8 file does not use; the weight quantizers stay FP32
QAT_AUTO_PRECISION = "fp32"
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cuda_supports_bf16() -> bool:
    """Whether this process's CUDA device computes BF16 natively (compute capability 8.0 or later)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def cpu_bf16_hazard(convs: list[tuple[int, int]]) -> str | None:
    """Where oneDNN's BF16 convolution backward goes wrong, among `convs` given as (stride, input map size) in
    network order: a stride-2 3x3 conv on a 1x1 map gets a weight gradient of garbage in the taps that see only
    padding (measured with torch 2.14.1: 15 of 20 backward passes off by more than 5%, NaN weights within two epochs
    of a tiny model; a 1x1 map at stride 1 and every larger map are within BF16's rounding). Names the first such
    conv, or None."""
    for i, (stride, size) in enumerate(convs):
        if stride > 1 and size == 1:
            return f"conv {i} is a stride-{stride} conv on a 1x1 map"
    return None


def block_convs(strides: list[int], image_size: int) -> list[tuple[int, int]]:
    """(stride, input map size) of each block of a network of these block `strides` at `image_size`."""
    convs, size = [], image_size
    for stride in strides:
        convs.append((stride, size))
        size = -(-size // stride)
    return convs


def model_convs(model: torch.nn.Module, example: torch.Tensor) -> list[tuple[int, int]]:
    """(stride, smaller input side) of each spatial conv of `model`, in the order one forward of `example` runs
    them."""
    convs: list[tuple[int, int]] = []

    def record(module, inputs, _output):
        if module.kernel_size != (1, 1):
            convs.append((max(module.stride), min(inputs[0].shape[-2:])))

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return convs


def resolve_precision(precision: str, device_type: str, flags: list[str] | None = None,
                      cuda_bf16: bool | None = None, cpu_hazard: str | None = None) -> str:
    """`precision` made explicit for a training on `device_type`: `auto` becomes bf16 on CPUs with `CPU_BF16_FLAGS`
    (`flags`, default this CPU's) unless the model has a `cpu_hazard` (`cpu_bf16_hazard`), and on CUDA devices with
    BF16 (`cuda_bf16`, default this one's), fp16 on other CUDA devices, else fp32. An explicit value is kept, except
    bf16 on a CPU with a `cpu_hazard`: a ValueError naming it."""
    if precision == "bf16" and device_type == "cpu" and cpu_hazard is not None:
        raise ValueError(f"precision: bf16 trains wrongly on CPU here ({cpu_hazard}: oneDNN's BF16 weight gradient "
                         f"of it is garbage); use fp32, auto, or a larger image_size")
    if precision != "auto":
        return precision
    if device_type == "cuda":
        return "bf16" if (cuda_supports_bf16() if cuda_bf16 is None else cuda_bf16) else "fp16"
    flags = cpu_flags() if flags is None else flags
    return "bf16" if any(f in flags for f in CPU_BF16_FLAGS) and cpu_hazard is None else "fp32"


def resolve_channels_last(channels_last: bool | str, device_type: str, flags: list[str] | None = None) -> bool:
    """`channels_last` made explicit for `device_type`: `auto` is True on CUDA and on CPUs with
    `CPU_CHANNELS_LAST_FLAGS` (`flags`, default this CPU's). An explicit value is kept."""
    if channels_last != "auto":
        return bool(channels_last)
    if device_type == "cuda":
        return True
    flags = cpu_flags() if flags is None else flags
    return all(f in flags for f in CPU_CHANNELS_LAST_FLAGS)


def missing_compiler(device_type: str) -> str | None:
    """Why `torch.compile` cannot build kernels for `device_type` here (one line), or None when it can: Inductor
    needs a C++ compiler for CPU kernels (`$CXX`, g++ or clang++) and Triton for CUDA ones."""
    if device_type == "cuda":
        return None if importlib.util.find_spec("triton") else "Triton is not installed"
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++"]
    if any(shutil.which(c) for c in candidates):
        return None
    return f"no C++ compiler on the PATH ({' or '.join(candidates)})"


def compiled(module: torch.nn.Module, device_type: str, what: str) -> torch.nn.Module:
    """`module` under `torch.compile` where the toolchain for `device_type` is present; else `module` itself, with
    one warning naming `what` asked for it."""
    reason = missing_compiler(device_type)
    if reason is not None:
        print(f"warning: {what}: compile is off: {reason}", file=sys.stderr)
        return module
    return torch.compile(module)
