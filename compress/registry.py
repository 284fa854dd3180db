"""The pipeline's stages as facts, defined once: the sections each reads, the stage whose model it takes, the file
it writes and which ranks run it. The recipe validates stage names against this table, the run directory derives
keys and artifact paths from it, the CLI lists it; `compress.stages.RUNNERS` maps each name to the function that
runs it.

It imports nothing of the pipeline's, so every module can read it from below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# "all": every DDP rank runs it (it trains); "main": rank 0 alone, the others wait and read its files;
# "training": every rank when its own recipe section says it trains (`Section.trains`), else rank 0 alone
Ranks = Literal["all", "main", "training"]


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    `reads`: the recipe sections whose values change its result; `reads_when_training` adds those it reads only
    when it trains (prune's fine-tunes between iterative steps). `input`: the stage whose model it consumes.
    `artifact`: the file it writes in the run directory (None: its result lives in `summary.json`)."""

    name: str
    reads: tuple[str, ...]
    input: str | None
    artifact: str | None
    ranks: Ranks
    reads_when_training: tuple[str, ...] = ()


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("train", ("model", "data", "train"), None, "train.pt", "all"),
        Stage("reparam", (), "train", "plain.pt", "main"),
        Stage("prune", ("prune",), "reparam", "pruned.pt", "training", reads_when_training=("finetune",)),
        Stage("finetune", ("finetune",), "prune", "finetuned.pt", "all"),
        Stage("quantize", ("quantize",), "finetune", "quantized.pt", "training"),
        Stage("export", ("export",), "quantize", "onnx", "main"),  # a folder of files
        Stage("bench", ("bench",), "export", None, "main"),
    )
}
STAGE_NAMES: tuple[str, ...] = tuple(STAGES)
