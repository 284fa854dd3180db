"""Running an exported ONNX file on a runtime of `compress.runtime`: its accuracy, and its parity with the PyTorch
model it was exported from. An FP32 file must compute its model's logits (`check_parity`); an INT8 file must agree
with its NNCF fake-quant model on the predicted class of nearly every image (`check_int8_parity`), else a runtime's
INT8 kernels differ from what was trained and validated."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.batches import split_batch
from compress.errors import UserError
from compress.precision import full_fp32_precision, within_tolerance
from compress.runtime import RUNTIMES, Session, describe_cpu, open_onnx


class ParityError(UserError, RuntimeError):
    """An FP32 ONNX file whose logits differ from its PyTorch model's: said in one line."""


def _batches(loader_or_batch) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
    """(images, labels-or-None) pairs from an image tensor, one (images, labels) tuple, or an iterable of either."""
    if isinstance(loader_or_batch, torch.Tensor):
        yield loader_or_batch, None
        return
    if _is_labelled_batch(loader_or_batch):
        yield loader_or_batch[0], loader_or_batch[1]
        return
    yield from map(split_batch, loader_or_batch)


def _is_labelled_batch(obj) -> bool:
    return (
        isinstance(obj, (list, tuple))
        and len(obj) == 2
        and all(isinstance(t, torch.Tensor) for t in obj)
        and obj[0].dim() == 4
        and obj[1].dim() == 1
    )


def _logits(session: Session, images: torch.Tensor) -> np.ndarray:
    return session.logits(images.detach().cpu().float().numpy())


def _torch_logits(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    """The reference logits for a parity check: full FP32 precision, never oneDNN's BF16."""
    with torch.no_grad(), full_fp32_precision():
        return model(images.cpu().float()).numpy()


def evaluate_onnx(
    path: str | Path, loader, runtime: str = "cpu", threads: int | None = None, reference: nn.Module | None = None
) -> dict:
    """Top-1/top-5 accuracy (percent) of an ONNX classifier over `loader`'s (images, labels) batches, run on
    `runtime` (a name in compress.runtime.RUNTIMES that runs ONNX files), with the per-image predicted classes and
    the logits. With a `reference` PyTorch model, the same pass also measures `max_abs_diff`, the largest |ONNX
    logit - PyTorch logit|, and `max_abs_logit`, the largest |PyTorch logit| (reference run in eval mode on CPU, a
    copy): what `check_parity` judges."""
    session = open_onnx(path, runtime, threads)
    reference = copy.deepcopy(reference).to("cpu").eval() if reference is not None else None
    logits, labels = [], []
    worst = scale = np.float32(0)  # np.maximum, not max(): a NaN logit must surface, not be skipped
    for images, target in _batches(loader):
        if target is None:
            raise ValueError("evaluate_onnx: the loader must yield (images, labels)")
        logits.append(_logits(session, images))
        labels.append(target.detach().cpu().numpy())
        if reference is not None:
            expected = _torch_logits(reference, images)
            worst = np.maximum(worst, np.abs(logits[-1] - expected).max())
            scale = np.maximum(scale, np.abs(expected).max())
    del session
    out = np.concatenate(logits)
    y = np.concatenate(labels)
    k = min(5, out.shape[1])
    topk = np.argsort(-out, axis=1)[:, :k]
    result = {
        "top1": float((topk[:, 0] == y).mean() * 100),
        "top5": float((topk == y[:, None]).any(axis=1).mean() * 100),
        "n": int(y.shape[0]),
        "predictions": topk[:, 0],
        "labels": y,
        "logits": out,
    }
    if reference is not None:
        result.update(max_abs_diff=float(worst), max_abs_logit=float(scale))
    return result


def check_parity(path: str | Path, result: dict, tolerance: float = 1e-4) -> None:
    """Raise ParityError unless `result`, from `evaluate_onnx(path, ..., reference=model)`, has the ONNX logits
    within `tolerance` of PyTorch's, relative to the largest |logit| (absolute below 1), as the re-param check."""
    if "max_abs_diff" not in result:
        raise ValueError("check_parity needs the result of evaluate_onnx(..., reference=model)")
    diff, scale = result["max_abs_diff"], result["max_abs_logit"]
    if not within_tolerance(diff, scale, tolerance):
        raise ParityError(
            f"ONNX {path} differs from PyTorch by {diff:.3g} at max |logit| {scale:.3g} "
            f"(allowed: {tolerance:g} x max(|logit|, 1))"
        )


def compare_with_model(path: str | Path, model: nn.Module, loader, runtimes: Sequence[str] = ("cpu",)) -> dict:
    """The ONNX file, run on each of `runtimes`, against a PyTorch `model` (in eval mode on CPU, a copy, run once per
    batch for all of them) on the same (images, labels) batches. For each runtime: `agreement`, the fraction of
    images where both predict the same class; `max_abs_diff` and `mean_abs_diff`, the largest and mean |ONNX logit -
    PyTorch logit|, with `logit_range`, the span (max - min) of the PyTorch logits, to read them against; each side's
    `top1` on these images (`onnx_top1`, `torch_top1`). Returns {runtime: those}."""
    sessions = {runtime: open_onnx(path, runtime) for runtime in runtimes}
    model = copy.deepcopy(model).to("cpu").eval()
    ours, theirs, labels = {runtime: [] for runtime in runtimes}, [], []
    for images, target in _batches(loader):
        for runtime, session in sessions.items():
            ours[runtime].append(_logits(session, images))
        theirs.append(_torch_logits(model, images))
        labels.append(None if target is None else target.detach().cpu().numpy())
    del sessions
    b = np.concatenate(theirs)
    y = np.concatenate(labels) if all(t is not None for t in labels) else None
    return {runtime: _comparison(runtime, np.concatenate(logits), b, y) for runtime, logits in ours.items()}


def _comparison(runtime: str, a: np.ndarray, b: np.ndarray, y: np.ndarray | None) -> dict:
    """One runtime's logits `a` against the model's `b` (and both against labels `y`, when given)."""
    diff = np.abs(a - b)
    result = {"runtime": runtime, "n": int(len(a)), "agreement": float((a.argmax(1) == b.argmax(1)).mean()),
              "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
              "logit_range": float(b.max() - b.min())}
    if y is not None:
        result.update(onnx_top1=float((a.argmax(1) == y).mean() * 100), torch_top1=float((b.argmax(1) == y).mean() * 100))
    return result


def check_int8_parity(path: str | Path, result: dict, min_agreement: float) -> None:
    """Raise ParityError, in one line naming the file, the runtime and the CPU, unless `result` (of
    `compare_with_model` against the file's fake-quant model) agrees on at least `min_agreement` of the images."""
    if result["agreement"] < min_agreement:
        label = RUNTIMES[result["runtime"]].label if result["runtime"] in RUNTIMES else result["runtime"]
        raise ParityError(
            f"INT8 {path} on {label} predicts what its fake-quant model predicts on {result['agreement']:.1%} of "
            f"{result['n']} images (export.int8_agreement: {min_agreement:.1%}); logits differ by up to "
            f"{result['max_abs_diff']:.3g} (mean {result['mean_abs_diff']:.3g}) on a range of {result['logit_range']:.3g}; "
            f"CPU {describe_cpu()}"
        )
