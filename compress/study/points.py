"""The study's points: one ordinary pipeline run per (strategy, keep), every one seeded with the same trained
base, so that a finished point is reused on a rerun and the strategies differ only in how they prune (each
strategy's record: `strategies`). A from-scratch point gets a RepVGG with per-stage widths searched to the same
MACs, trained from random init on as many images as the base and a fine-tune together saw, distilled from the
pruned points' teacher (the unpruned plain model).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from repvgg import PlainRepVGG

from ..context import StageContext
from ..data import Data
from ..models import recipe_architecture
from ..prune import TARGET_KINDS
from ..prune.cost import MacCost
from ..recipe import Distill, Recipe, validate_recipe
from ..registry import STAGE_NAMES
from ..rundir import PipelineError, RunDir
from .strategies import STRATEGIES

BASE_STAGES = ("train", "reparam")
MAC_TOLERANCE = 0.02  # scratch widths: MACs within 2% of the target


def updated(recipe: Recipe, **sections) -> Recipe:
    """A copy of the recipe with some sections' fields replaced (validated like the original), as one pipeline."""
    raw = recipe.model_dump(mode="json")
    for section, fields in sections.items():
        if isinstance(fields, dict):
            raw[section] = {**(raw.get(section) or {}), **fields}
        else:
            raw[section] = fields
    raw["study"] = None
    return validate_recipe(raw)


def base_recipe(recipe: Recipe) -> Recipe:
    return updated(recipe, stages=list(BASE_STAGES))


def base_dir_of(path: Path) -> Path:
    """The run directory holding a trained base: a study's DIR/base, or any run directory."""
    path = Path(path)
    return path / "base" if (path / "base" / "summary.json").exists() else path


def check_base_dir(recipe: Recipe, path: Path) -> RunDir:
    """`study.base_dir`, checked: its train and reparam stages are finished under this recipe's keys (the same
    model, data, train sections and seed), else one line saying what differs."""
    run = RunDir(base_dir_of(path), base_recipe(recipe))
    for stage in BASE_STAGES:
        entry = run.entry(stage)
        if entry is None or not run.path(stage).exists():
            raise PipelineError(f"study.base_dir: {run.out_dir} has no finished {stage} stage")
        stale = run.staleness(stage, entry)
        if stale:
            raise PipelineError(f"study.base_dir: {run.out_dir} does not hold this recipe's base ({stale})")
        if not run.is_done(stage):
            raise PipelineError(f"study.base_dir: {run.out_dir}'s base was evaluated on another test set "
                                f"(data.test_subset differs)")
    return run


def seed_from_base(base: StageContext, point: StageContext) -> None:
    """Give a point the shared trained model: the base's train and reparam artifacts linked in and their summary
    entries copied. Their keys are the point's too: the point recipe differs from the base's only in sections
    those stages do not read."""
    for stage in BASE_STAGES:
        if point.dir.is_done(stage):
            continue
        if base.dir.key(stage) != point.dir.key(stage):
            raise RuntimeError(f"study: the point {point.out_dir.name} would not reuse the base's {stage} stage")
        target = point.dir.path(stage)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        try:
            target.hardlink_to(base.dir.path(stage))
        except OSError:
            shutil.copy2(base.dir.path(stage), target)
        point.summary["stages"][stage] = base.summary["stages"][stage]
    point.dir.write_summary()


def scratch_widths(recipe: Recipe, keep: float, num_classes: int, example: torch.Tensor, unit: int) -> list[int]:
    """Per-stage widths (stem, stages 1-4) of the recipe's architecture whose plain model has `keep` of its MACs,
    within 2% where the widths allow (`scaled_widths`)."""
    arch = recipe_architecture(recipe, num_classes)
    full = arch.config()["widths"]
    with torch.device("meta"):  # only its shapes: the pruner's memoised MAC count sizes each candidate
        plain = PlainRepVGG([b.spec for b in arch.blocks()], num_classes)
    cost = MacCost(plain, example)
    depths = [1, *arch.num_blocks]
    return scaled_widths(full, lambda widths: cost.cost([w for w, n in zip(widths, depths) for _ in range(n)]),
                         keep * cost.cost([w for w, n in zip(full, depths) for _ in range(n)]), unit)


def scaled_widths(full: list[int], cost: Callable[[list[int]], float], target: float, unit: int,
                  tolerance: float = MAC_TOLERANCE) -> list[int]:
    """Stage widths `full` scaled by one factor (bisected) so that `cost` (growing with the widths) is `target`
    within `tolerance` where the widths allow, so the shape stays the original's: widths rounded to multiples of
    `unit`, or of a finer step (unit/2, ... 1) where rounding to `unit` misses the target by more. The closest
    found otherwise."""

    def scaled(f: float, step: int) -> list[int]:
        return [max(step, int(round(w * f / step)) * step) for w in full]

    best, step = None, unit
    while step >= 1:
        lo, hi = 0.0, 1.0
        for _ in range(20):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cost(scaled(mid, step)) < target else (lo, mid)
        best = min((scaled(lo, step), scaled(hi, step)), key=lambda w: abs(cost(w) / target - 1))
        if abs(cost(best) / target - 1) <= tolerance:
            break
        step //= 2
    return best


def point_name(strategy: str, keep: float, seed: int = 0) -> str:
    """A point's directory name: strategy and keep, then the seed's offset past the first (`study.seeds`)."""
    return f"{strategy}_{keep:g}" + (f"_seed{seed}" if seed else "")


def reseeded(recipe: Recipe, offset: int, from_scratch: bool) -> Recipe:
    """A point's recipe for its `offset`-th seed (`study.seeds`): a pruned point keeps the base's seed (it shares
    the base) and fine-tunes and quantizes with its own; a scratch point trains from a seed of its own."""
    if offset == 0:
        return recipe
    seed = recipe.seed + offset
    if from_scratch:
        return updated(recipe, seed=seed)
    return updated(recipe, finetune={"seed": seed}, quantize={"seed": seed})


def unpruned_recipe(recipe: Recipe) -> Recipe:
    """The reference point: the base's plain model, quantized and exported (FP32 and INT8)."""
    return updated(recipe, stages=["train", "reparam", "quantize", "export"],
                   export={"artifacts": ["plain_fp32", "plain_int8"]})


def pruned_recipe(recipe: Recipe, strategy: str, keep: float) -> Recipe:
    """A pruning strategy's point: the recipe's prune settings with the strategy's own (`strategies`), its target
    set to `keep`, fine-tuned as it says."""
    record = STRATEGIES[strategy]
    prune = {**dict.fromkeys(TARGET_KINDS), "mode": "plain", "scope": recipe.prune.scope, **record.prune,
             record.target: keep}
    if "latency" in record.prune:  # over the recipe's latency settings
        prune["latency"] = {**recipe.prune.latency.model_dump(mode="json"), **record.prune["latency"]}
    # only the strategy that measures rebranch fine-tunes re-branched blocks; the other plain ones keep bn
    structure = record.structure or recipe.finetune.structure
    if structure == "rebranch" and record.structure != "rebranch":
        structure = "bn"
    stages = [s for s in STAGE_NAMES if s != "bench"]
    point = updated(recipe, prune=prune, finetune={"structure": structure}, stages=stages,
                    export={"artifacts": ["pruned_fp32", "pruned_int8"]})
    return resrep_twin(point) if record.prune_trains else point


def resrep_twin(recipe: Recipe) -> Recipe:
    """A pruned point's ResRep twin: the same target, reached by ResRep trained on the point's fine-tune images
    (`finetune.epochs` on `finetune.train_subset`), with no fine-tune after."""
    resrep = {**recipe.prune.resrep.model_dump(mode="json"), "epochs": recipe.finetune.epochs}
    return updated(recipe, prune={"method": "resrep", "reconstruct": False, "resrep": resrep},
                   finetune={"epochs": 0})


def pruned_images(recipe: Recipe, data: Data) -> tuple[int, int]:
    """Training images a pruned point's model saw: (base training, fine-tuning), QAT not counted."""
    base = recipe.train.epochs * data.images_per_epoch()
    epochs = recipe.finetune.epochs + (recipe.prune.resrep.epochs if recipe.prune.method == "resrep" else 0)
    return base, epochs * data.with_train_subset(recipe.finetune.train_subset).images_per_epoch()


def scratch_recipe(recipe: Recipe, widths: list[int], data: Data, teacher: Path | None) -> Recipe:
    """A scratch point: the architecture at `widths` trained from random init for as many images as base and
    fine-tune together (whole epochs of the training set: at least as many), distilled from `teacher` when given
    (with the fine-tune's distillation settings), then quantized and exported as the pruned points are."""
    arch_model = recipe.model.model_dump(mode="json")
    model = {**arch_model, "name": None, "width_multiplier": None, "widths": widths, "checkpoint": None,
             "pretrained": None, "num_blocks": list(recipe_architecture(recipe, data.num_classes).num_blocks)}
    epochs = max(1, math.ceil(sum(pruned_images(recipe, data)) / data.images_per_epoch() - 1e-9))
    train = {"epochs": epochs}
    if teacher is not None:
        train.update(distill=(recipe.finetune.distill or Distill()).model_dump(mode="json"), teacher=str(teacher))
    return updated(recipe, model=model, train=train, stages=["train", "reparam", "quantize", "export"],
                   export={"artifacts": ["plain_fp32", "plain_int8"]})
