"""What a stage function receives: the recipe, its run directory, the data and the process it runs in. It loads a
stage's input model (checked against the recipe) and saves a stage's output; the pipeline records the metrics."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .data import Data
from .env import Env
from .files import CheckpointError, build_model, load_checkpoint, save_model
from .quant import rebuild_quantized
from .recipe import Recipe
from .rundir import PipelineError, RunDir


def stale_line(why: str, add: list[str]) -> str:
    """The one line of a stale input: why, and which stages to add to --stages."""
    return f"{why}: add {', '.join(add)} to --stages, or run without --stages"


class StageContext:
    """One run directory under one (resolved) recipe, as a stage sees it."""

    def __init__(self, recipe: Recipe, out_dir: Path, env: Env, data: Data):
        self.recipe, self.env, self.data = recipe, env, data
        self.dir = RunDir(out_dir, recipe)
        self.out_dir = self.dir.out_dir

    @property
    def summary(self) -> dict:
        return self.dir.summary

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def writer(self):
        """The TensorBoard SummaryWriter (rank 0), or None."""
        return self.env.writer

    def load(self, stage: str) -> nn.Module:
        """The model standing for `stage`'s output (a skipped stage's input), checked against the recipe."""
        source = self.dir.source(stage)
        if source is None or not self.dir.path(source).exists():
            raise PipelineError(f"stage '{stage}' output is missing in {self.out_dir}: run the stages before it first")
        path = self.dir.path(source)
        record = load_checkpoint(path)
        stale = self.dir.staleness(source, record.get("provenance") if isinstance(record, dict) else None)
        if stale:
            raise PipelineError(stale_line(stale, self.dir.stale_upstream(source) or [source]))
        if source == "quantize":
            return rebuild_quantized(record, path, self.data.example_input())
        try:
            return build_model(record)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {path}: {e}") from None

    def save(self, stage: str, model: nn.Module) -> None:
        """Rank 0 writes `stage`'s artifact, with its provenance."""
        if self.env.main:
            save_model(model, self.dir.path(stage), provenance=self.dir.provenance(stage))

    def wait_for_main(self) -> None:
        """Under DDP: every rank waits until rank 0 has written its files and summary, then reads the summary."""
        if self.env.world_size > 1:
            torch.distributed.barrier(group=self.env.wait_group)
            if not self.env.main:
                self.dir.summary = self.dir.read_summary()
