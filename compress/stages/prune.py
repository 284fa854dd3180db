"""Stage `prune`: the plain model (or, for `prune.mode: multibranch`, the training-time one) pruned to the recipe's
target. The recipe's `prune` section becomes the pruner's own typed options here, and only here."""

from __future__ import annotations

import dataclasses
import sys

import torch

from repvgg import PlainRepVGG, RepVGG

from ..context import StageContext
from ..prune import LatencyOptions, PruneOptions, criterion, load_or_build_table, prune_model
from ..prune.cost import LatencyCost
from ..prune.measure import fastest_runtime, measure_ratios
from ..prune.resrep import ResRepOptions, compactor_weights, resrep_prune
from ..recipe import LatencyCfg, PruneCfg
from ..rundir import PipelineError
from ..tensorboard_log import log_prune, runtime_tag
from ..train import evaluate, lr_sequence
from .finetune import finetune_data, finetune_model


def latency_options(cfg: LatencyCfg) -> LatencyOptions:
    """The latency table's options from the recipe's `prune.latency` section."""
    return LatencyOptions(provider=cfg.provider, threads=cfg.threads, batch=cfg.batch, precision=cfg.precision,
                          grid_points=cfg.grid_points, rounds=cfg.rounds, cache_dir=cfg.cache_dir, verify=cfg.verify,
                          stem=cfg.stem or "none")


def prune_options(cfg: PruneCfg) -> PruneOptions:
    """The pruner's options from the recipe's `prune` section (its target: the one `PruneCfg.target` says)."""
    return PruneOptions(target=cfg.target, mode=cfg.mode, importance=cfg.importance, scope=cfg.scope,
                        max_layer_ratio=cfg.max_layer_ratio, min_width=cfg.min_width, isomorphic=cfg.isomorphic,
                        round_to=cfg.round_to, steps=cfg.steps, prune_first_layer=cfg.prune_first_layer,
                        gradient_batches=cfg.gradient_batches, latency=latency_options(cfg.latency),
                        planner=cfg.planner, sensitivity_images=cfg.sensitivity_images,
                        sensitivity_grid=cfg.sensitivity_grid, sensitivity_cache=cfg.sensitivity_cache,
                        reconstruct=cfg.reconstruct, reconstruct_images=cfg.reconstruct_images,
                        reconstruct_ridge=cfg.reconstruct_ridge)


def resolve_provider(options: LatencyOptions, model: torch.nn.Module, image_size: int,
                     log=None) -> tuple[LatencyOptions, dict | None]:
    """`provider: auto` made the fastest runtime here (`fastest_runtime`), and what was timed to choose it; other
    providers as they are."""
    if options.provider != "auto":
        return options, None
    chosen, times = fastest_runtime(model, options, image_size, log=log)
    return dataclasses.replace(options, provider=chosen), {"chosen": chosen, "unpruned_ms": times}


def _expect(model, cls, stage: str, mode: str):
    if not isinstance(model, cls):
        raise PipelineError(f"prune.mode={mode} needs a {cls.__name__} from stage '{stage}', got {type(model).__name__}")
    return model


def _same_on_every_rank(widths: list[int]) -> None:
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, widths)
    if any(w != gathered[0] for w in gathered):
        raise PipelineError(f"DDP ranks pruned to different widths ({gathered[0]} on rank 0): importance must be "
                            f"deterministic across ranks")


def run(c: StageContext) -> dict | None:
    """Rank 0 alone, or with `prune.steps` > 1 every DDP rank: the fine-tunes between steps train under DDP, so
    every rank prunes the same model the same way (fixed batches, same seed) and checks it did."""
    cfg = c.recipe.prune
    options = prune_options(cfg)
    if options.sensitivity_cache is None:
        options = dataclasses.replace(options, sensitivity_cache=c.out_dir / "sensitivity.json")
    if cfg.mode == "plain":
        model = _expect(c.load("reparam"), PlainRepVGG, "reparam", cfg.mode)
    else:
        model = _expect(c.load("train"), RepVGG, "train", cfg.mode)
    model.to(c.device)
    every_rank = c.env.world_size > 1 and c.dir.trains("prune")

    def finetune_between_steps(m, step: int) -> None:
        step_cfg = c.recipe.finetune.model_copy(update={"epochs": cfg.steps_finetune_epochs, "distill": None})
        finetune_model(c, m, step_cfg, tag=f"prune_step{step}", key=f"{c.dir.artifact_key('prune')}:{step}")

    example = c.data.example_input().to(c.device)
    table, choice = None, None
    log = (lambda line: print(f"[prune] {line}", file=sys.stderr)) if c.env.main else None
    if options.target.latency:  # rank 0 measures the table (or reads it from the cache), other pruning ranks wait
        if c.env.main or not every_rank:
            latency, choice = resolve_provider(options.latency, model, example.shape[-1], log=log)
        if every_rank:  # every pruning rank plans on rank 0's choice
            shared = [latency if c.env.main else None]
            torch.distributed.broadcast_object_list(shared, src=0, group=c.env.wait_group)
            latency = shared[0]
        options = dataclasses.replace(options, latency=latency)
        table = load_or_build_table(
            model, options.latency, example.shape[-1], cfg.round_to, rank=c.env.rank,
            wait=(lambda: torch.distributed.barrier(group=c.env.wait_group)) if every_rank else None, log=log)
    measure = measure_ratios
    if every_rank:  # rank 0 alone times a plan (timings on every rank would share the cores), the others take it
        def measure(*args, **kwargs):
            shared = [measure_ratios(*args, **kwargs) if c.env.main else None]
            torch.distributed.broadcast_object_list(shared, src=0, group=c.env.wait_group)
            return shared[0]
    if cfg.method == "resrep":
        report = _resrep(c, model, options, example, table)
    else:
        report = _importance(c, model, options, cfg, example, table, measure, finetune_between_steps)
    if choice is not None:
        report["latency"]["provider_choice"] = choice
    if every_rank:
        _same_on_every_rank(report["widths_after"])
    if not c.env.main:
        return None
    metrics = evaluate(model, c.data.test_loader(), c.device)
    if c.writer is not None:
        log_prune(c.writer, report, metrics["top1"], runtime_tag(options.latency.provider, c.device.type),
                  options.latency.batch)
    c.save("prune", model)
    return {**report, "top1": metrics["top1"], "top5": metrics["top5"]}


def _resrep(c: StageContext, model: PlainRepVGG, options: PruneOptions, example: torch.Tensor,
            table) -> dict:
    """ResRep: compactors trained with the fine-tune's settings for `prune.resrep.epochs` (distilled from the
    unpruned plain model when `finetune.distill` is set), then cut and merged (`compress.prune.resrep`)."""
    cfg = c.recipe.prune.resrep
    train_cfg = c.recipe.finetune.model_copy(update={"epochs": cfg.epochs})
    lrs = lr_sequence(train_cfg, finetune_data(c, train_cfg).steps_per_epoch())
    teacher = c.load("reparam") if train_cfg.distill is not None else None
    resrep = ResRepOptions(first_mask=cfg.first_mask, mask_every=cfg.mask_every, target_by=cfg.target_by,
                           lasso=cfg.lasso)

    def train(m, before_step) -> dict:
        return finetune_model(c, m, train_cfg, tag="resrep", key=c.dir.artifact_key("prune"), teacher=teacher,
                              before_step=before_step, bare_steps=frozenset(compactor_weights(m)))

    latency = LatencyCost(table, model) if table is not None else None
    return resrep_prune(model, options, resrep, example, train, lrs, latency)


def _importance(c: StageContext, model, options: PruneOptions, cfg: PruneCfg, example: torch.Tensor, table,
                measure, finetune_between_steps) -> dict:
    """The channels the criterion ranks lowest, removed at once (`prune_model`)."""
    # fixed, unaugmented batches for taylor/hessian: the same importance whenever (and wherever) it is run
    images = cfg.gradient_batches * c.data.cfg.batch_size
    if criterion(cfg.importance).measured:
        images = max(images, cfg.sensitivity_images)
    if cfg.reconstruct:
        images = max(images, cfg.reconstruct_images)
    batches = c.data.calibration_loader(images)
    return prune_model(model, options, example, batches=batches, between_steps=finetune_between_steps,
                       latency_table=table, measure=measure)
