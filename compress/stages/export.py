"""Stage `export`: every model the run made as an ONNX file, each evaluated on the file by ONNX Runtime; FP32 files
checked against PyTorch, INT8 files stored as QDQ graphs with INT8 weights."""

from __future__ import annotations

import sys

import torch_pruning as tp
from torch import nn

from ..context import StageContext
from ..deploy import METADATA_KEY, target_warning
from ..evaluation import check_int8_parity, check_parity, compare_with_model, evaluate_onnx
from ..export import export_onnx
from ..files import write_predictions
from ..recipe import ExportCfg
from ..rundir import PipelineError
from ..runtime import RUNTIMES
from ..stem import rewrite_stem
from .quantize import ptq

PARITY_RUNTIMES = ("cpu", "openvino")  # the CPU runtimes an INT8 file is checked on, where they can run


def onnx_sources(c: StageContext) -> dict[str, str]:
    """artifact name -> the stage whose model it exports: every model the recipe makes, as `export.artifacts`
    asks. A run that prunes and quantizes also exports the unpruned plain model in INT8 (PTQ at export), the
    reference of INT8 speed-ups."""
    pruned = c.dir.source("finetune") in ("prune", "finetune")
    sources = {
        "train_fp32": "train",
        "plain_fp32": "reparam",
        "plain_int8": ("reparam" if c.dir.active("quantize") else None) if pruned else "quantize",
        "pruned_fp32": c.dir.source("finetune") if pruned else None,
        "pruned_int8": "quantize" if pruned else None,
    }
    wanted = c.recipe.export.artifacts
    return {name: s for name, s in sources.items()
            if s is not None and c.dir.active(s) and (wanted is None or name in wanted)}


def _float_source(c: StageContext, name: str) -> str:
    """The stage of the float model an artifact is (or was quantized from)."""
    return {"train": "train", "plain": "reparam", "pruned": c.dir.source("finetune")}[name.split("_")[0]]


def _macs_params(c: StageContext, name: str, model: nn.Module, done: dict) -> dict:
    """MACs and parameters of an exported model: counted on the float model (an INT8 file has its FP32 twin's)."""
    twin = done.get(name.replace("_int8", "_fp32"))
    if name.endswith("_int8") and twin is not None:
        return {"macs": twin["macs"], "params": twin["params"]}
    float_model = c.load(_float_source(c, name)) if name.endswith("_int8") else model
    macs, params = tp.utils.count_ops_and_params(float_model.cpu().eval(), c.data.example_input())
    return {"macs": macs, "params": params}


def int8_parity(c: StageContext, path, qmodel: nn.Module) -> dict:
    """The INT8 file against its fake-quant model on `export.parity_images` test images (a fixed random sample, so
    every class is in it), on every CPU runtime that can run here; the run stops (one line) where they disagree on
    more than `export.int8_agreement` allows."""
    cfg = c.recipe.export
    images = c.data.test_sample_loader(cfg.parity_images)
    runtimes = [r for r in PARITY_RUNTIMES if RUNTIMES[r].unavailable() is None]
    results = compare_with_model(path, qmodel, images, runtimes)  # the fake-quant model runs once for all
    for result in results.values():
        check_int8_parity(path, result, cfg.int8_agreement)
    return results


def run(c: StageContext) -> dict:
    example = c.data.example_input()
    test_images = c.data.test_loader(limit=c.recipe.export.eval_subset)
    provenance = {"repvgg_compress.artifact_key": c.dir.artifact_key("export"), "repvgg_compress.recipe": c.recipe.name}
    target = c.recipe.quantize.target_device
    artifacts = {}
    for name, stage in onnx_sources(c).items():
        model = c.load(stage).cpu().eval()
        int8 = name.endswith("int8")
        if int8 and stage != "quantize":
            model = ptq(c, model)
        metadata = {**provenance, METADATA_KEY: target} if int8 else provenance
        path = export_onnx(model, c.dir.path("export") / f"{name}.onnx", example, opset=c.recipe.export.opset,
                           int8=int8, metadata=metadata)
        field = ExportCfg.stem_field(int8)
        stem = getattr(c.recipe.export, field)
        if stem is not None:  # before every check below: they check the file as rewritten
            try:
                rewrite_stem(path, stem)
            except ValueError as e:
                raise PipelineError(f"export.{field}={stem} on {path}: {e}") from None
        entry = {"path": str(path), "size_bytes": path.stat().st_size, "stem": stem or "none",
                 **_macs_params(c, name, model, artifacts)}
        warning = target_warning(target, str(path)) if int8 else None  # the target just written into its metadata
        if warning:
            print(warning, file=sys.stderr)
        # one pass over the test set: ONNX top-1, and for FP32 files the parity with PyTorch
        result = evaluate_onnx(path, test_images, reference=None if int8 else model)
        entry.update({k: v for k, v in result.items() if k in ("top1", "top5", "n", "max_abs_diff", "max_abs_logit")})
        # per-image predictions: paired comparisons between files resample the same test images
        entry["predictions"] = str(path.with_suffix(".predictions.npz"))
        write_predictions(entry["predictions"], result["predictions"], result["labels"])
        if int8:
            entry["target_device"] = target
            entry["int8_parity"] = int8_parity(c, path, model)
        else:
            check_parity(path, result)
        artifacts[name] = entry
    if not artifacts:
        raise PipelineError("export found no model to export: run train or reparam first")
    return {"artifacts": artifacts, "test_images": c.data.test_images(c.recipe.export.eval_subset),
            "num_classes": c.data.num_classes}
