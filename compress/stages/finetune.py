"""Stage `finetune`: the pruned model trained again, optionally distilled from the unpruned plain model; a plain model
trains as `finetune.structure` says, a multi-branch one is re-parameterized afterwards (exactness checked)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from repvgg import PlainRepVGG, RepVGG, fold_bn, insert_bn, rebranch

from ..context import StageContext
from ..data import Data
from ..recipe import FinetuneCfg
from ..reparam import check_equivalent, to_plain
from ..tensorboard_log import add_scalar
from ..train import evaluate, fit


def finetune_data(c: StageContext, cfg: FinetuneCfg) -> Data:
    """The data a fine-tune trains on: the run's, under the fine-tune's seed, on its training subset."""
    return c.data.reseeded(cfg.seed).with_train_subset(cfg.train_subset)


def finetune_model(c: StageContext, model: nn.Module, cfg: FinetuneCfg, *, tag: str, key: str,
                   teacher: nn.Module | None = None, before_step: Callable[[int], None] | None = None,
                   bare_steps: frozenset[str] = frozenset()) -> dict:
    """Train a pruned model in place. A plain one as `cfg.structure` says: as it is (plain), with a temporary BN
    after each conv folded back after (bn), or re-branched into RepVGG blocks at its widths and re-parameterized
    back after, checked exact at full precision (rebranch). Every DDP rank builds the same model: fixed,
    unaugmented calibration batches, and the fine-tune's seed (`cfg.seed`, else the recipe's) for the new 1x1
    branches, its shuffles and its subset. `before_step` and `bare_steps` go to `fit` (ResRep's masks)."""
    structure = cfg.structure if isinstance(model, PlainRepVGG) else "multibranch"
    seeded = c.data.reseeded(cfg.seed)
    calibration = seeded.calibration_loader(min(512, len(seeded.train_set)))
    net = model
    if structure == "bn":
        insert_bn(model, calibration)
    elif structure == "rebranch":
        net = rebranch(model, calibration, seed=seeded.seed).to(c.device)
    data = finetune_data(c, cfg)
    result = fit(net, cfg, data, c.env, tag=tag, ckpt_path=c.out_dir / f"{tag}.ckpt", key=key, teacher=teacher,
                 distill=cfg.distill, before_step=before_step, bare_steps=bare_steps)
    result["images_seen"] = cfg.epochs * data.images_per_epoch()
    if structure == "bn":
        fold_bn(model)
    elif structure == "rebranch":  # fold back into the pruned plain model itself (callers hold it)
        folded = to_plain(net)
        result.update(check_equivalent(net, folded, c.data, c.env))
        model.load_state_dict(folded.state_dict())
    return {**result, "structure": structure}


def run(c: StageContext) -> dict | None:
    cfg = c.recipe.finetune
    model = c.load("prune").to(c.device)
    teacher = c.load("reparam") if cfg.distill is not None else None
    result = finetune_model(c, model, cfg, tag="finetune", key=c.dir.artifact_key("finetune"), teacher=teacher)
    if not c.env.main:  # every rank trained (DDP); rank 0 checks, evaluates and saves
        return None
    if isinstance(model, RepVGG):  # multibranch baseline: re-parameterize only now, and check it stays exact
        plain = to_plain(model)
        result.update(check_equivalent(model, plain, c.data, c.env))
        model = plain
    final = evaluate(model, c.data.test_loader(), c.device)
    if c.writer is not None:
        add_scalar(c.writer, "prune/top1_after_finetune", final["top1"], 0,
                   "top-1 (%) on the test set of the pruned model after fine-tuning (re-parameterized), in PyTorch")
    c.save("finetune", model)
    return {**result, "top1": final["top1"], "top5": final["top5"]}
