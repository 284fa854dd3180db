"""Stage `train`: the recipe's starting model (random init, a checkpoint, or timm's pretrained weights), trained
multi-branch."""

from __future__ import annotations

from ..context import StageContext
from ..files import load_model
from ..models import initial_model
from ..train import fit


def run(c: StageContext) -> dict:
    cfg = c.recipe.train
    model, origin = initial_model(c.recipe, c.data.num_classes)
    teacher = load_model(cfg.teacher, c.recipe.model.stem_stride) if cfg.teacher is not None else None
    result = fit(model, cfg, c.data, c.env, tag="train", ckpt_path=c.out_dir / "train.ckpt",
                 key=c.dir.artifact_key("train"), teacher=teacher, distill=cfg.distill)
    c.save("train", model)
    result["start"] = origin  # random init, a checkpoint, or timm's pretrained weights (tag, hub revision)
    result["images_seen"] = cfg.epochs * c.data.images_per_epoch()
    if c.data.cfg.kind == "imagefolder":
        result["skipped_images"] = c.data.skipped_images()
    return result
