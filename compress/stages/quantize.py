"""Stage `quantize`: NNCF INT8, PTQ or PTQ + QAT, of the plain model the run ends with."""

from __future__ import annotations

import copy

from torch import nn

from repvgg import RepVGG

from ..context import StageContext
from ..files import model_record
from ..quant import quantize_model, save_quantized
from ..recipe import OptimCfg, QuantCfg
from ..rundir import PipelineError
from ..train import evaluate, evaluate_test_set, fit


def calibration_options(cfg: QuantCfg) -> dict:
    """The quantizer's calibration settings from the recipe's `quantize` section."""
    return {"calibration_size": cfg.calibration_size, "fp32_first_last": cfg.fp32_first_last,
            "overflow_fix": cfg.overflow_fix, "batchwise_statistics": cfg.batchwise_statistics,
            "activation_ranges": cfg.activation_ranges}


def ptq(c: StageContext, model: nn.Module) -> nn.Module:
    """`model` quantized by PTQ alone, with the recipe's calibration settings (the export stage's INT8 reference)."""
    cfg = c.recipe.quantize
    calibration = c.data.reseeded(cfg.seed).calibration_loader(cfg.calibration_size)
    return quantize_model(model, calibration, c.data.example_input(),
                          **calibration_options(cfg))


def run(c: StageContext) -> dict | None:
    """Every DDP rank runs QAT together; only rank 0 evaluates and saves (the others return None and read its
    summary entry). PTQ runs on rank 0 alone (`registry`)."""
    cfg = c.recipe.quantize
    seeded = c.data.reseeded(cfg.seed)  # calibration images and QAT's shuffles and subset
    source = c.dir.source("finetune")
    model = c.load("finetune")
    if isinstance(model, RepVGG):
        raise PipelineError("quantize needs the plain model: run reparam first")
    model = model.to(c.device).eval()
    teacher = copy.deepcopy(model) if cfg.distill is not None else None
    qat_cfg = OptimCfg(epochs=cfg.epochs, optimizer=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                       precision=cfg.precision, channels_last=cfg.channels_last)

    trained = {}  # QAT's `fit` ends with a test-set evaluation of the final model: not done twice
    ptq_metrics = {}  # QAT starts from PTQ: its top-1 before training, beside QAT's

    def qat(qmodel) -> None:
        ptq_metrics.update(evaluate_test_set(qmodel, c.data, c.env))  # every rank: sharded under DDP
        data = seeded.with_train_subset(cfg.train_subset)
        trained.update(fit(qmodel, qat_cfg, data, c.env, tag="qat", ckpt_path=c.out_dir / "qat.ckpt",
                           key=c.dir.artifact_key("quantize"), teacher=teacher, distill=cfg.distill))

    qmodel = quantize_model(model, seeded.calibration_loader(cfg.calibration_size),
                            c.data.example_input().to(c.device), train_fn=qat if cfg.trains else None,
                            **calibration_options(cfg))
    if not c.env.main:
        return None
    metrics = trained or evaluate(qmodel, c.data.test_loader(), c.device)
    save_quantized(qmodel, c.dir.path("quantize"), model_record(model), provenance=c.dir.provenance("quantize"))
    return {"mode": cfg.mode, "source": source, "top1": metrics["top1"], "top5": metrics["top5"],
            "ptq_top1": ptq_metrics.get("top1", metrics["top1"]), "target_device": cfg.target_device,
            "overflow_fix": cfg.overflow_fix}
