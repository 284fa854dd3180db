"""INT8 quantization with NNCF: post-training calibration (PTQ), optionally followed by quantization-aware training.

Weights are quantized per output channel and symmetrically, by default on half the int8 range (NNCF's
overflow fix: see `quantize_model`); activations follow NNCF's default preset (`performance`: symmetric, unsigned
after ReLU). The quantized model is the same `PlainRepVGG` object with NNCF's fake-quantize
hooks attached; it trains like any module, and `compress.export.export_onnx(..., int8=True)` turns it into an
ONNX graph of QuantizeLinear/DequantizeLinear pairs that ONNX Runtime runs with INT8 kernels.

A quantized model is saved the NNCF way, never as a pickled module: the float model's architecture record,
`nncf.torch.get_config(qmodel)` (where the quantizers sit, as plain data) and the full state_dict (weights and
quantizer scales). Loading rebuilds the float model, re-inserts the quantizers with
`nncf.torch.load_from_config` and loads the state_dict.

NNCF computes fake quantization with a C++/CUDA extension it compiles on first use (about 2.5 minutes on 2 CPU
cores, and nvcc on GPU machines). We use NNCF's pure-PyTorch reference functions instead by default (same
numbers, no compilation); REPVGG_QUANT_KERNELS=native opts into the compiled extension.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from compress.batches import split_batch
from compress.files import CheckpointError, build_model, load_checkpoint, torch_save

FORMAT = "repvgg-compress-int8/1"
OVERFLOW_FIX = ("enable", "first_layer_only", "disable")
ACTIVATION_RANGES = ("mean_minmax", "minmax", "mean_quantile", "histogram")  # NNCF's RangeEstimatorParametersSet
KERNELS_ENV = "REPVGG_QUANT_KERNELS"  # "reference" (default) or "native" (NNCF's compiled extension)
# NNCF gives up after 60 s waiting for its extension to compile, too short on a small machine.
_EXTENSION_TIMEOUT_ENV = "NNCF_EXTENSION_LOAD_TIMEOUT"
_EXTENSION_TIMEOUT_S = "900"


@contextmanager
def quiet_third_party_notices() -> Iterator[None]:
    """Mute, for the block only, two notices that tell our users nothing: torch's "No CUDA runtime is found,
    using CUDA_HOME" (logged when NNCF imports torch.utils.cpp_extension on a machine with a CUDA toolkit but no
    GPU) and the pytree "Enum subclass ... register_constant" deprecation (logged when torchao, which nncf.strip
    imports, registers its enums)."""
    loggers = [logging.getLogger(name) for name in ("torch.utils.cpp_extension", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def import_nncf_torch():
    """`nncf.torch`, imported without its third-party notices (the first import is the one that logs them)."""
    with quiet_third_party_notices():
        import nncf.torch
    return nncf.torch


def use_reference_kernels() -> None:
    """Make NNCF fake-quantize with its pure-PyTorch reference functions (no C++ extension build), process-wide.

    NNCF's own fallback wraps them in `torch.compile`, which needs a C++ toolchain too; these are the plain ones.
    """
    import_nncf_torch()
    from nncf.torch.quantization import extensions as ext
    from nncf.torch.quantization.reference import torch_executor

    class _Reference:
        Quantize_forward = staticmethod(torch_executor.forward)
        Quantize_backward = staticmethod(torch_executor.backward)

    for namespace in (ext.QuantizedFunctionsCPU, ext.QuantizedFunctionsCUDA):
        if isinstance(namespace, ext.ExtensionNamespace):
            namespace._loaded_namespace = _Reference


def _prepare_kernels() -> None:
    # reference by default: no 2.5-minute compile on a fresh machine, no nvcc needed on a GPU one
    kind = os.environ.get(KERNELS_ENV, "reference").strip().lower()
    if kind not in ("native", "reference"):
        raise ValueError(f"{KERNELS_ENV}={kind!r}: expected 'native' or 'reference'")
    if kind == "reference":
        use_reference_kernels()
    else:
        os.environ.setdefault(_EXTENSION_TIMEOUT_ENV, _EXTENSION_TIMEOUT_S)


class _CalibrationImages:
    """Re-iterable view of the first `limit` images of a loader, as (possibly truncated) batches.

    NNCF counts its subset size in dataset items; items here are batches, so `len()` is the batch count.
    """

    def __init__(self, loader: Iterable, limit: int, device: torch.device):
        self.loader, self.limit, self.device = loader, limit, device
        self._batches = sum(1 for _ in self)
        if self._batches == 0:
            raise ValueError("quantize: the calibration loader yielded no images")

    def __iter__(self) -> Iterator[torch.Tensor]:
        seen = 0
        for batch in self.loader:
            if seen >= self.limit:
                break
            images = split_batch(batch)[0][: self.limit - seen]
            seen += images.shape[0]
            yield images.to(self.device)

    def __len__(self) -> int:
        return self._batches


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _layer_nodes(model: nn.Module, example_input: torch.Tensor) -> tuple[list[str], list[str]]:
    """NNCF graph names of the convolutions and of the Linears, each in graph order."""
    from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import build_nncf_graph
    from nncf.torch.function_hook.wrapper import wrap_model

    graph = build_nncf_graph(wrap_model(copy.deepcopy(model)), example_input)
    nodes = list(graph.topological_sort())
    convs = [n.node_name for n in nodes if n.node_type in ("conv2d", "conv1d", "conv3d")]
    linears = [n.node_name for n in nodes if n.node_type in ("linear", "addmm", "matmul")]
    return convs, linears


def layer_node_names(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """NNCF graph names of the convolutions, then the Linears, in graph order (e.g. 'conv/conv2d/0', ...,
    'linear/linear/0'): what `quantize_model`'s `keep_fp32` names."""
    convs, linears = _layer_nodes(model, example_input)
    return convs + linears


def first_last_node_names(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """NNCF graph names of the first convolution and every Linear (the head)."""
    convs, linears = _layer_nodes(model, example_input)
    return convs[:1] + linears


def quantize_model(
    model: nn.Module,
    calibration_loader: Iterable,
    example_input: torch.Tensor,
    *,
    calibration_size: int,
    train_fn: Callable[[nn.Module], nn.Module | None] | None = None,
    fp32_first_last: bool = False,
    keep_fp32: Sequence[str] = (),
    overflow_fix: str = "enable",
    batchwise_statistics: bool = True,
    activation_ranges: str = "mean_minmax",
) -> nn.Module:
    """INT8 fake-quantized copy of `model` (left untouched), calibrated on the first `calibration_size` images of
    `calibration_loader` (PTQ); with `train_fn`, then trained by `train_fn(qmodel)` (QAT; it may return the model
    or train it in place). `fp32_first_last` keeps the first conv and the head in FP32, `keep_fp32` the layers of
    those NNCF node names (`layer_node_names`).

    `overflow_fix` is NNCF's OverflowFix: "enable" (default) quantizes every conv/linear weight to half the
    8-bit range ([-64, 64]) so that x86 CPUs without VNNI (AVX2, plain AVX-512) cannot saturate the int16 intermediate sums
    of ONNX Runtime's u8s8 kernels; with "first_layer_only" (NNCF's default) or "disable", ORT on such a CPU
    gives logits up to ~0.6 off the fake-quant model's (measured on an AVX2 EPYC), flipping predictions.

    Activation ranges are per tensor, estimated over the calibration images as `activation_ranges` says (one of
    ACTIVATION_RANGES: NNCF's default, the mean over samples of each one's min and max; the global min and max; the
    mean of each sample's outlier quantiles; or histogram-optimal), a sample being a calibration batch with
    `batchwise_statistics`, else one image.
    """
    import nncf
    from nncf.common.quantization.structs import QuantizationScheme
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        OverflowFix,
        QuantizationParameters,
    )
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    if overflow_fix not in OVERFLOW_FIX:
        raise ValueError(f"quantize: overflow_fix must be one of {', '.join(OVERFLOW_FIX)}, got {overflow_fix!r}")
    if activation_ranges not in ACTIVATION_RANGES:
        raise ValueError(f"quantize: activation_ranges must be one of {', '.join(ACTIVATION_RANGES)}, got "
                         f"{activation_ranges!r}")
    _prepare_kernels()
    device = _model_device(model)
    model = copy.deepcopy(model).eval()
    example_input = example_input.to(device)
    data = _CalibrationImages(calibration_loader, calibration_size, device)
    fp32 = list(keep_fp32) + (first_last_node_names(model, example_input) if fp32_first_last else [])
    ignored = nncf.IgnoredScope(names=list(dict.fromkeys(fp32))) if fp32 else None
    advanced = AdvancedQuantizationParameters(
        weights_quantization_params=QuantizationParameters(mode=QuantizationScheme.SYMMETRIC, per_channel=True),
        batchwise_statistics=batchwise_statistics,
        overflow_fix=OverflowFix(overflow_fix),
        activations_range_estimator_params=getattr(RangeEstimatorParametersSet, activation_ranges.upper()),
    )
    qmodel = nncf.quantize(
        model,
        nncf.Dataset(data),
        subset_size=len(data),
        ignored_scope=ignored,
        advanced_parameters=advanced,
    )
    if train_fn is not None:
        trained = train_fn(qmodel)
        qmodel = trained if isinstance(trained, nn.Module) else qmodel
    return qmodel.eval()


def is_quantized(model: nn.Module) -> bool:
    """True for a model carrying NNCF compression hooks."""
    import_nncf_torch()
    from nncf.torch.function_hook.wrapper import get_hook_storage, is_wrapped

    return is_wrapped(model) and any(True for _ in get_hook_storage(model).named_hooks())


def save_quantized(qmodel: nn.Module, path: str | Path, base_record: dict, **extra) -> None:
    """Save a quantized model: `base_record` (`compress.files.model_record` of the float model) for the architecture,
    NNCF's quantizer placement config and the quantized model's full state_dict. Written atomically."""
    import nncf.torch

    # The config holds StrEnum members and tuples: a JSON round trip makes it plain data (weights_only loads).
    nncf_config = json.loads(json.dumps(nncf.torch.get_config(qmodel)))
    state = {k: v.detach().cpu() for k, v in qmodel.state_dict().items()}
    float_keys = set(base_record["state_dict"])
    missing = float_keys - set(state)
    if missing:
        raise ValueError(f"save_quantized: base_record does not describe this model (missing {sorted(missing)[:3]})")
    record = {
        **{k: v for k, v in base_record.items() if k != "state_dict"},
        "state_dict": {k: state[k] for k in base_record["state_dict"]},  # trained (QAT) float weights
        "quant_format": FORMAT,
        "nncf_config": nncf_config,
        "quant_state": {k: v for k, v in state.items() if k not in float_keys},
        **extra,
    }
    torch_save(record, path)


def load_quantized(path: str | Path, example_input: torch.Tensor | None = None) -> nn.Module:
    """Rebuild a model written by `save_quantized` (eval mode, CPU); `example_input`, when given, is run once
    to check the result."""
    return rebuild_quantized(load_checkpoint(path), path, example_input)


def rebuild_quantized(record: dict, path: str | Path, example_input: torch.Tensor | None = None) -> nn.Module:
    """`load_quantized` of a record already read from `path` (named in errors)."""
    import nncf.torch

    _prepare_kernels()
    if not isinstance(record, dict) or record.get("quant_format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: not a quantized model (no '{FORMAT}' record)")
    try:
        model = build_model(record)
        qmodel = nncf.torch.load_from_config(model, record["nncf_config"])
        qmodel.load_state_dict({**record["state_dict"], **record["quant_state"]}, strict=True)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot rebuild the quantized model: {e}") from None
    qmodel.eval()
    if example_input is not None:
        with torch.no_grad():
            qmodel(example_input.to(_model_device(qmodel)))
    return qmodel
