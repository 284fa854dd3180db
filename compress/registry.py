"""The pipeline's stages, defined once: the recipe validates stage names against this table, the run directory
derives keys and artifact paths from it, the pipeline dispatches through it and the CLI lists it.

This module imports nothing from the pipeline (stage functions are named as "module:function" and imported
when a stage runs), so the recipe, the run directory and the stages can all read it without an import cycle.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .recipe import Recipe

Ranks = Literal["all", "main"]


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    `reads`: the recipe sections whose values change its result (`also_reads` adds sections that only some
    settings make it read). `input`: the stage whose model it consumes. `artifact`: the file it writes in the
    run directory (None: its result lives in `summary.json`). `ranks`: under DDP, whether every process runs it
    ("all": it trains) or rank 0 alone ("main", the others wait and read its files)."""

    name: str
    reads: tuple[str, ...]
    input: str | None
    artifact: str | None
    ranks: Ranks | Callable[[Recipe], Ranks]
    run: str
    also_reads: Callable[[Recipe], tuple[str, ...]] | None = None

    def sections(self, recipe: Recipe) -> tuple[str, ...]:
        """Every recipe section this stage reads under `recipe`."""
        return self.reads + (self.also_reads(recipe) if self.also_reads else ())

    def on_every_rank(self, recipe: Recipe) -> bool:
        return (self.ranks(recipe) if callable(self.ranks) else self.ranks) == "all"

    def function(self) -> Callable:
        module, name = self.run.split(":")
        return getattr(importlib.import_module(module), name)


def _prune_ranks(recipe: Recipe) -> Ranks:
    return "all" if recipe.prune.steps > 1 else "main"  # fine-tuning between steps trains under DDP


def _prune_also_reads(recipe: Recipe) -> tuple[str, ...]:
    return ("finetune",) if recipe.prune.steps > 1 else ()  # the fine-tune between steps uses its settings


def _quantize_ranks(recipe: Recipe) -> Ranks:
    return "all" if recipe.quantize.mode == "qat" else "main"  # PTQ has nothing to train


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("train", ("model", "data", "train"), None, "train.pt", "all", "compress.stages:train"),
        Stage("reparam", (), "train", "plain.pt", "main", "compress.stages:reparam"),
        Stage("prune", ("prune",), "reparam", "pruned.pt", _prune_ranks, "compress.stages:prune",
              also_reads=_prune_also_reads),
        Stage("finetune", ("finetune",), "prune", "finetuned.pt", "all", "compress.stages:finetune"),
        Stage("quantize", ("quantize",), "finetune", "quantized.pt", _quantize_ranks, "compress.stages:quantize"),
        Stage("export", ("export",), "quantize", "onnx", "main", "compress.stages:export"),  # a folder of files
        Stage("bench", ("bench",), "export", None, "main", "compress.stages:bench"),
    )
}
STAGE_NAMES: tuple[str, ...] = tuple(STAGES)
