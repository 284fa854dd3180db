"""The recipe's starting model: the architecture it names at random init, its checkpoint (ours, official or
timm's) or timm's pretrained weights, checked against that architecture, with the head resized to the data."""

from __future__ import annotations

import sys
from pathlib import Path

from torch import nn

from repvgg import PlainRepVGG, RepVGG, create_model, from_state_dict

from .files import CheckpointError, load_model
from .recipe import Recipe


def recipe_architecture(recipe: Recipe, num_classes: int) -> RepVGG | None:
    """The multi-branch model the recipe names (by name or explicit depths and widths), or None when only a
    checkpoint defines it."""
    cfg = recipe.model
    if cfg.name is not None:
        return create_model(cfg.name, num_classes=num_classes, stem_stride=cfg.stem_stride)
    if cfg.num_blocks is not None:
        return RepVGG(cfg.num_blocks, cfg.width_multiplier, cfg.override_groups_map, num_classes, cfg.stem_stride,
                      widths=cfg.widths)
    return None


def architecture_mismatch(expected: RepVGG, got: nn.Module) -> str | None:
    """The first layer where `got` differs from the recipe's architecture (heads excluded), or None."""
    if isinstance(got, RepVGG):
        want, have = expected.state_dict(), got.state_dict()
        for key in want:
            if key.startswith("linear."):
                continue
            if key not in have:
                return f"'{key}' is missing"
            if want[key].shape != have[key].shape:
                return f"'{key}' has shape {tuple(have[key].shape)}, the recipe's model {tuple(want[key].shape)}"
        extra = next((k for k in have if k not in want), None)
        return f"'{extra}' is not in the recipe's model" if extra else None
    specs, wanted = got.layer_specs(), [b.spec for b in expected.blocks()]
    for i, want in enumerate(wanted):
        if i >= len(specs) or specs[i] != want:
            return f"layer {i} is {specs[i] if i < len(specs) else 'missing'}, the recipe's model {want}"
    return f"layer {len(wanted)} is not in the recipe's model" if len(specs) > len(wanted) else None


def timm_name(model_name: str) -> str:
    """timm's name for one of our CONFIGS names: RepVGG-B1g4 -> repvgg_b1g4."""
    return model_name.lower().replace("-", "_") if model_name.startswith("RepVGG-") else f"repvgg_{model_name.lower()}"


def timm_pretrained(model_name: str) -> tuple[dict, dict]:
    """timm's pretrained weights for `model_name` (downloaded once into timm's Hugging Face cache) and where
    they came from: timm's model/tag, hub id and, when the cache shows it, the hub revision."""
    try:
        import timm
    except ImportError:
        raise CheckpointError("model.pretrained: timm needs the timm package: pip install 'repvgg-compress[timm]', "
                              "or pass model.checkpoint: FILE (.pth or .safetensors)") from None
    name = timm_name(model_name)
    try:
        net = timm.create_model(name, pretrained=True)
    except Exception as e:  # offline, hub errors, a name timm lacks: many types, one line for all
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"model.pretrained: timm could not load pretrained {name} ({type(e).__name__}: {first}); "
                              f"connect once so timm caches it, or pass model.checkpoint: FILE") from None
    cfg = net.pretrained_cfg
    origin = {"pretrained": "timm", "model": f"{name}.{cfg.get('tag')}" if cfg.get("tag") else name,
              "hf_hub_id": cfg.get("hf_hub_id"), "timm": timm.__version__}
    revision = _hub_revision(cfg.get("hf_hub_id"))
    if revision:
        origin["revision"] = revision
    return net.state_dict(), origin


def _hub_revision(repo_id: str | None) -> str | None:
    """The commit of the cached hub snapshot timm read (its folder name in the cache), if any."""
    if not repo_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(repo_id, filename)
        if isinstance(path, str):
            return Path(path).parent.name
    return None


def initial_model(recipe: Recipe, num_classes: int) -> tuple[nn.Module, dict]:
    """The recipe's starting model and where its weights came from: its architecture at random init, its
    checkpoint (ours, official or timm's) or timm's pretrained weights, with the head resized to the data. A
    checkpoint must match the architecture the recipe names, if it names one."""
    cfg = recipe.model
    classes = cfg.num_classes or num_classes
    expected = recipe_architecture(recipe, classes)
    if cfg.pretrained == "timm":
        state, origin = timm_pretrained(cfg.name)
        model = from_state_dict(state, cfg.stem_stride)
        source = origin["model"]
    elif cfg.checkpoint is not None:
        model, origin, source = load_model(cfg.checkpoint, cfg.stem_stride), {"checkpoint": str(cfg.checkpoint)}, cfg.checkpoint
    else:
        return expected, {"init": "random"}
    mismatch = architecture_mismatch(expected, model) if expected is not None else None
    if mismatch:
        raise CheckpointError(f"model {source} does not match the recipe's model: {mismatch}")
    if isinstance(model, PlainRepVGG) and recipe.train.epochs > 0:
        raise CheckpointError(f"model {source} is deploy-form (re-parameterized): it has no branches left to train; "
                              f"set train.epochs: 0")
    if model.linear.out_features != classes:  # transfer: new head for the new classes
        print(f"[model] new {classes}-class head on {source}", file=sys.stderr)
        if recipe.train.epochs == 0:
            print(f"warning: the new {classes}-class head is untrained (train.epochs: 0): top-1 stays at chance "
                  f"until fine-tuning", file=sys.stderr)
        model.linear = nn.Linear(model.linear.in_features, classes)
    return model, origin
