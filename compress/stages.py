"""The stage functions `compress.registry` names: each reads its input artifact, calls its stage module, saves its
output and returns the metrics that go into `summary.json` (None on a DDP rank whose results rank 0 records)."""

from __future__ import annotations

import copy
import sys
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from repvgg import PlainRepVGG, RepVGG

from .files import load_model, model_record, write_predictions
from .models import initial_model
from .recipe import OptimCfg
from .registry import STAGES
from .reparam import check_equivalent, reparam_stage, to_plain
from .rundir import PipelineError
from .train import evaluate, fit

if TYPE_CHECKING:
    from .pipeline import Pipeline


def train(p: Pipeline) -> dict:
    cfg = p.recipe.train
    model, origin = initial_model(p.recipe, p.data.num_classes)
    teacher = load_model(cfg.teacher, p.recipe.model.stem_stride) if cfg.teacher is not None else None
    result = fit(model, cfg, p.data, p.env, tag="train", ckpt_path=p.out_dir / "train.ckpt",
                 key=p.dir.artifact_key("train"), teacher=teacher, distill=cfg.distill)
    p.save("train", model)
    result["start"] = origin  # random init, a checkpoint, or timm's pretrained weights (tag, hub revision)
    result["images_seen"] = cfg.epochs * p.data.images_per_epoch()
    if p.data.cfg.kind == "imagefolder":
        result["skipped_images"] = p.data.skipped_images()
    return result


def reparam(p: Pipeline) -> dict:
    plain, metrics = reparam_stage(p.load("train"), p.data, p.env)
    p.save("reparam", plain)
    return metrics


def _expect(model, cls, stage: str, mode: str):
    if not isinstance(model, cls):
        raise PipelineError(f"prune.mode={mode} needs a {cls.__name__} from stage '{stage}', got {type(model).__name__}")
    return model


def prune(p: Pipeline) -> dict | None:
    """Rank 0 alone, or with `prune.steps` > 1 every DDP rank: the fine-tunes between steps train under DDP, so
    every rank prunes the same model the same way (fixed batches, same seed) and checks it did."""
    from .prune import load_or_build_table, prune_model

    cfg = p.recipe.prune
    if cfg.mode == "plain":
        model = _expect(p.load("reparam"), PlainRepVGG, "reparam", cfg.mode)
    else:
        model = _expect(p.load("train"), RepVGG, "train", cfg.mode)
    model.to(p.env.device)

    def finetune_between_steps(m, step: int) -> None:
        step_cfg = p.recipe.finetune.model_copy(update={"epochs": cfg.steps_finetune_epochs, "distill": None})
        _finetune(p, m, step_cfg, tag=f"prune_step{step}", key=f"{p.dir.artifact_key('prune')}:{step}")

    example = p.data.example_input().to(p.env.device)
    table = None
    if cfg.latency_target:  # rank 0 measures the table (or reads it from the cache), other pruning ranks wait
        every_rank = p.env.world_size > 1 and STAGES["prune"].on_every_rank(p.recipe)
        table = load_or_build_table(
            model, cfg, example.shape[-1], p.env.device.type, rank=p.env.rank,
            wait=(lambda: torch.distributed.barrier(group=p.env.wait_group)) if every_rank else None,
            log=(lambda line: print(f"[prune] {line}", file=sys.stderr)) if p.env.main else None)
    # fixed, unaugmented batches for taylor/hessian: the same importance whenever (and wherever) it is run
    batches = p.data.calibration_loader(cfg.gradient_batches * p.data.cfg.batch_size)
    report = prune_model(model, cfg, example, batches=batches, between_steps=finetune_between_steps,
                         latency_table=table)
    if p.env.world_size > 1 and STAGES["prune"].on_every_rank(p.recipe):
        _same_on_every_rank(report["widths_after"])
    if not p.env.main:
        return None
    metrics = evaluate(model, p.data.test_loader(), p.env.device)
    if p.env.writer is not None:
        p.env.writer.add_figure("prune/widths", _widths_figure(report["widths_before"], report["widths_after"]), 0)
        p.env.writer.add_scalar("prune/top1", metrics["top1"], 0)  # step 0: before fine-tuning
        if "latency" in report:
            for name in ("before_ms", "budget_ms", "predicted_ms"):
                p.env.writer.add_scalar(f"prune/latency_{name}", report["latency"][name], 0)
    p.save("prune", model)
    return {**report, "top1": metrics["top1"], "top5": metrics["top5"]}


def _same_on_every_rank(widths: list[int]) -> None:
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, widths)
    if any(w != gathered[0] for w in gathered):
        raise PipelineError(f"DDP ranks pruned to different widths ({gathered[0]} on rank 0): importance must be "
                            f"deterministic across ranks")


def _widths_figure(before: list[int], after: list[int]):
    fig, ax = plt.subplots(figsize=(max(6, len(before) * 0.35), 3.5))
    idx = range(len(before))
    ax.bar(idx, before, color="#bbbbbb", label="before")
    ax.bar(idx, after, color="#1f77b4", label="after")
    ax.set_xlabel("layer")
    ax.set_ylabel("output channels")
    ax.legend()
    fig.tight_layout()
    return fig


def _finetune(p: Pipeline, model, cfg, *, tag: str, key: str, teacher=None) -> dict:
    """Train a pruned model in place. A plain one as `finetune.structure` says: as it is (plain), with a temporary
    BN after each conv folded back after (bn), or re-branched into RepVGG blocks at its widths and
    re-parameterized back after, checked exact at full precision (rebranch). Every DDP rank builds the same
    model: fixed, unaugmented calibration batches, and the recipe's seed for the new 1x1 branches."""
    from repvgg import fold_bn, insert_bn, rebranch

    structure = cfg.structure if isinstance(model, PlainRepVGG) else "multibranch"
    calibration = p.data.calibration_loader(min(512, len(p.data.train_set)))
    net = model
    if structure == "bn":
        insert_bn(model, calibration)
    elif structure == "rebranch":
        net = rebranch(model, calibration, seed=p.recipe.seed).to(p.env.device)
    data = p.data.with_train_subset(cfg.train_subset)
    result = fit(net, cfg, data, p.env, tag=tag, ckpt_path=p.out_dir / f"{tag}.ckpt", key=key, teacher=teacher,
                 distill=cfg.distill)
    result["images_seen"] = cfg.epochs * data.images_per_epoch()
    if structure == "bn":
        fold_bn(model)
    elif structure == "rebranch":  # fold back into the pruned plain model itself (callers hold it)
        folded = to_plain(net)
        result.update(check_equivalent(net, folded, p.data, p.env))
        model.load_state_dict(folded.state_dict())
    return {**result, "structure": structure}


def finetune(p: Pipeline) -> dict | None:
    cfg = p.recipe.finetune
    model = p.load("prune").to(p.env.device)
    teacher = p.load("reparam") if cfg.distill is not None else None
    result = _finetune(p, model, cfg, tag="finetune", key=p.dir.artifact_key("finetune"), teacher=teacher)
    if not p.env.main:  # every rank trained (DDP); rank 0 checks, evaluates and saves
        return None
    if isinstance(model, RepVGG):  # multibranch baseline: re-parameterize only now, and check it stays exact
        plain = to_plain(model)
        result.update(check_equivalent(model, plain, p.data, p.env))
        model = plain
    final = evaluate(model, p.data.test_loader(), p.env.device)
    if p.env.writer is not None:
        p.env.writer.add_scalar("prune/top1", final["top1"], 1)  # step 1: after fine-tuning
    p.save("finetune", model)
    return {**result, "top1": final["top1"], "top5": final["top5"]}


def quantize(p: Pipeline) -> dict | None:
    """Every DDP rank runs QAT together; only rank 0 evaluates and saves (the others return None and read its
    summary entry). PTQ runs on rank 0 alone (`registry`)."""
    from .quant import quantize_model, save_quantized

    cfg = p.recipe.quantize
    source = p.dir.source("finetune")
    model = p.load("finetune")
    if isinstance(model, RepVGG):
        raise PipelineError("quantize needs the plain model: run reparam first")
    model = model.to(p.env.device).eval()
    teacher = copy.deepcopy(model) if cfg.distill is not None else None
    qat_cfg = OptimCfg(epochs=cfg.epochs, optimizer="sgd", lr=cfg.lr, weight_decay=cfg.weight_decay, amp=False,
                       channels_last=False)

    trained = {}  # QAT's `fit` ends with a test-set evaluation of the final model: not done twice

    def qat(qmodel) -> None:
        data = p.data.with_train_subset(cfg.train_subset)
        trained.update(fit(qmodel, qat_cfg, data, p.env, tag="qat", ckpt_path=p.out_dir / "qat.ckpt",
                           key=p.dir.artifact_key("quantize"), teacher=teacher, distill=cfg.distill))

    qmodel = quantize_model(model, cfg, p.data.calibration_loader(cfg.calibration_size),
                            p.data.example_input().to(p.env.device), train_fn=qat if cfg.mode == "qat" else None,
                            overflow_fix=cfg.overflow_fix)
    if not p.env.main:
        return None
    metrics = trained or evaluate(qmodel, p.data.test_loader(), p.env.device)
    save_quantized(qmodel, p.dir.path("quantize"), model_record(model), provenance=p.dir.provenance("quantize"))
    return {"mode": cfg.mode, "source": source, "top1": metrics["top1"], "top5": metrics["top5"]}


def _onnx_sources(p: Pipeline) -> dict[str, str]:
    """artifact name -> the stage whose model it exports: every model the recipe makes, as `export.artifacts`
    asks. A run that prunes and quantizes also exports the unpruned plain model in INT8 (PTQ at export), the
    reference of INT8 speed-ups."""
    pruned = p.dir.source("finetune") in ("prune", "finetune")
    sources = {
        "train_fp32": "train",
        "plain_fp32": "reparam",
        "plain_int8": ("reparam" if p.dir.active("quantize") else None) if pruned else "quantize",
        "pruned_fp32": p.dir.source("finetune") if pruned else None,
        "pruned_int8": "quantize" if pruned else None,
    }
    wanted = p.recipe.export.artifacts
    return {name: s for name, s in sources.items()
            if s is not None and p.dir.active(s) and (wanted is None or name in wanted)}


def _float_source(p: Pipeline, name: str) -> str:
    """The stage of the float model an artifact is (or was quantized from)."""
    return {"train": "train", "plain": "reparam", "pruned": p.dir.source("finetune")}[name.split("_")[0]]


def _macs_params(p: Pipeline, name: str, model, done: dict) -> dict:
    """MACs and parameters of an exported model: counted on the float model (an INT8 file has its FP32 twin's)."""
    import torch_pruning as tp

    twin = done.get(name.replace("_int8", "_fp32"))
    if name.endswith("_int8") and twin is not None:
        return {"macs": twin["macs"], "params": twin["params"]}
    float_model = p.load(_float_source(p, name)) if name.endswith("_int8") else model
    macs, params = tp.utils.count_ops_and_params(float_model.cpu().eval(), p.data.example_input())
    return {"macs": macs, "params": params}


def _plain_ptq(p: Pipeline, model):
    """The INT8 reference: the unpruned plain model, PTQ with the recipe's calibration settings."""
    from .quant import quantize_model

    cfg = p.recipe.quantize
    return quantize_model(model, cfg.model_copy(update={"mode": "ptq"}), p.data.calibration_loader(cfg.calibration_size),
                          p.data.example_input(), overflow_fix=cfg.overflow_fix)


def export(p: Pipeline) -> dict:
    from .export import check_parity, evaluate_onnx, export_onnx

    example = p.data.example_input()
    test_images = p.data.test_loader(limit=p.recipe.export.eval_subset)
    provenance = {"repvgg_compress.artifact_key": p.dir.artifact_key("export"), "repvgg_compress.recipe": p.recipe.name}
    artifacts = {}
    for name, stage in _onnx_sources(p).items():
        model = p.load(stage).cpu().eval()
        int8 = name.endswith("int8")
        if int8 and stage != "quantize":
            model = _plain_ptq(p, model)
        path = export_onnx(model, p.dir.path("export") / f"{name}.onnx", example, opset=p.recipe.export.opset,
                           int8=int8, metadata=provenance)
        entry = {"path": str(path), "size_bytes": path.stat().st_size, **_macs_params(p, name, model, artifacts)}
        # one pass over the test set: ONNX top-1, and for FP32 files the parity with PyTorch
        result = evaluate_onnx(path, test_images, reference=None if int8 else model)
        entry.update({k: v for k, v in result.items() if k in ("top1", "top5", "n", "max_abs_diff", "max_abs_logit")})
        # per-image predictions: paired comparisons between files resample the same test images
        entry["predictions"] = str(path.with_suffix(".predictions.npz"))
        write_predictions(entry["predictions"], result["predictions"], result["labels"])
        if not int8:
            check_parity(path, result)
        artifacts[name] = entry
    if not artifacts:
        raise PipelineError("export found no model to export: run train or reparam first")
    return {"artifacts": artifacts}


def _int8_speedups(results: list[dict], batch: int) -> dict:
    """FP32/INT8 latency of each quantized artifact against its own FP32 twin: the median of per-round ratios
    (both were timed in the same rounds, so machine drift cancels)."""
    rounds = {(r["artifact"], r["provider"]): r["round_medians_ms"] for r in results if r["batch"] == batch}
    speedups = {}
    for (name, provider), int8 in rounds.items():
        fp32 = rounds.get((name.replace("_int8", "_fp32"), provider))
        if name.endswith("_int8") and fp32:
            ratios = sorted(f / i for f, i in zip(fp32, int8))
            speedups[f"{name}@{provider}"] = ratios[len(ratios) // 2]
    return speedups


def _latency_check(p: Pipeline, results: list[dict]) -> dict | None:
    """The prune stage's latency prediction beside the bench's measurement of the same file, runtime and batch
    (the pruned model in the table's precision), when the run pruned to a latency target and bench timed it."""
    prune = p.summary["stages"].get("prune", {}).get("latency")
    if not prune:
        return None
    cfg = p.recipe.prune.latency
    artifact = f"pruned_{cfg.precision}"
    measured = next((r["median_ms"] for r in results
                     if (r["artifact"], r["provider"], r["batch"]) == (artifact, cfg.provider, cfg.batch)), None)
    return {"artifact": artifact, "provider": cfg.provider, "batch": cfg.batch, "budget_ms": prune["budget_ms"],
            "predicted_ms": prune["predicted_ms"], "measured_ms": measured}


def bench(p: Pipeline) -> dict:
    from pathlib import Path

    from .bench import accuracy_latency_figure, benchmark

    cfg = p.recipe.bench
    artifacts = p.summary["stages"].get("export", {}).get("artifacts")
    if not p.dir.active("export") or not artifacts:
        raise PipelineError("bench needs the export stage's ONNX files: run export first")
    paths = {name: Path(a["path"]) for name, a in artifacts.items()}
    reference = "plain_fp32" if "plain_fp32" in paths else None  # ratios: speed-up over the unpruned plain model
    # PyTorch eager beside ONNX Runtime: the FP32 models (the INT8 one only exists as fake-quant in PyTorch)
    eager = {name: p.load(stage) for name, stage in _onnx_sources(p).items() if name.endswith("fp32") and name in paths}
    result = benchmark(paths, cfg, cfg.image_size or p.data.cfg.image_size, torch_models=eager, reference=reference,
                       torch_device=p.env.device)
    main_batch = cfg.main_batch or cfg.batch_sizes[0]
    result["int8_speedup"] = _int8_speedups(result["results"], main_batch)
    predicted = _latency_check(p, result["results"])
    if predicted:
        result["prune_latency"] = predicted
    points = []
    for r in result["results"]:
        if r["batch"] == main_batch and r["provider"] == "cpu" and r["artifact"] in artifacts:
            points.append({"name": r["artifact"], "latency_ms": r["median_ms"], "top1": artifacts[r["artifact"]]["top1"]})
    if p.env.writer is not None and points:
        p.env.writer.add_figure("bench/accuracy_latency", accuracy_latency_figure(points), 0)
        for pt in points:
            p.env.writer.add_scalar(f"bench/top1/{pt['name']}", pt["top1"], 0)
        # every runtime's latency of a file side by side: one chart per file, one line per runtime
        for r in result["results"]:
            if r["batch"] == main_batch:
                p.env.writer.add_scalar(f"bench/latency_ms/{r['artifact']}/{r['provider']}", r["median_ms"], 0)
        p.env.writer.add_custom_scalars({"bench: latency (ms) by runtime": {
            name: ["Multiline", [rf"bench/latency_ms/{name}/.*"]] for name in paths}})
    return {**result, "curve": points}
