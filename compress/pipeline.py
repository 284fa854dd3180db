"""Runs a recipe's stages in order over one run directory.

Every stage reads its input model from a file an earlier stage wrote and writes its own (architecture + state
dict, atomically), so a stage can run alone, a finished stage is never redone, and a stage whose inputs changed
(recipe sections, or an upstream stage's result) is recomputed: each stage's key is a hash of its own recipe
sections and of its input stage's key, recorded in `summary.json`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from repvgg import RepVGG, create_model

from .data import Data
from .io import CheckpointError, load_model, save_model, write_json
from .recipe import Recipe
from .train import Env

# stage -> (recipe sections it reads, the stage whose output it consumes)
STAGE_INPUTS = {
    "train": (("model", "data", "train"), None),
    "reparam": ((), "train"),
    "prune": (("prune",), "reparam"),
    "finetune": (("finetune", "prune"), "prune"),
    "quantize": (("quantize",), "finetune"),
    "export": (("export",), "quantize"),
    "bench": (("bench",), "export"),
}
ARTIFACTS = {"train": "train.pt", "reparam": "plain.pt", "prune": "pruned.pt", "finetune": "finetuned.pt",
             "quantize": "quantized.pt"}


class PipelineError(RuntimeError):
    """A run-level problem (missing input stage, locked run dir), said in one line."""


class RunLock:
    """One run per directory: a second concurrent run gets the holder's pid."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / ".lock"
        self.file = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise PipelineError(f"run dir {self.path.parent} is in use by another run (pid {holder})") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def initial_model(recipe: Recipe, num_classes: int) -> nn.Module:
    """The recipe's architecture, or its checkpoint (ours or official) with the head resized to the data."""
    cfg = recipe.model
    classes = cfg.num_classes or num_classes
    if cfg.checkpoint is not None:
        model = load_model(cfg.checkpoint)
        if model.linear.out_features != classes:  # transfer: new head for the new classes
            print(f"[model] new {classes}-class head on {cfg.checkpoint}", file=sys.stderr)
            model.linear = nn.Linear(model.linear.in_features, classes)
        return model
    if cfg.name is not None:
        return create_model(cfg.name, num_classes=classes, stem_stride=cfg.stem_stride)
    return RepVGG(cfg.num_blocks, cfg.width_multiplier, cfg.override_groups_map, classes, cfg.stem_stride)


class Pipeline:
    def __init__(self, recipe: Recipe, out_dir: Path, env: Env, data: Data):
        self.recipe, self.out_dir, self.env, self.data = recipe, Path(out_dir), env, data
        self.summary_path = self.out_dir / "summary.json"
        self.summary = json.loads(self.summary_path.read_text()) if self.summary_path.exists() else {}
        self.summary.setdefault("recipe", recipe.name)
        self.summary.setdefault("stages", {})

    # ---- keys and artifacts -------------------------------------------------------------------------------
    def key(self, stage: str) -> str:
        """Hash of the recipe sections this stage and every stage upstream of it read."""
        sections, upstream = STAGE_INPUTS[stage]
        own = self.recipe.section_hash(*sections)
        return own if upstream is None else _hash(own, self.key(upstream))

    def path(self, stage: str) -> Path:
        return self.out_dir / ARTIFACTS[stage]

    def is_done(self, stage: str) -> bool:
        entry = self.summary["stages"].get(stage)
        produced = stage not in ARTIFACTS or self.path(stage).exists()
        return entry is not None and entry.get("key") == self.key(stage) and produced

    def latest(self, stage: str) -> str | None:
        """The newest stage at or before `stage` whose model artifact exists (skipped stages pass through)."""
        order = list(STAGE_INPUTS)
        for s in reversed(order[: order.index(stage) + 1]):
            if s in ARTIFACTS and self.path(s).exists() and s in self.summary["stages"]:
                return s
        return None

    def load(self, stage: str) -> nn.Module:
        source = self.latest(stage)
        if source is None:
            raise PipelineError(f"stage '{stage}' output is missing in {self.out_dir}: run the stages before it first")
        if source == "quantize":
            from .quant import load_quantized

            return load_quantized(self.path(source), self.data.example_input())
        try:
            return load_model(self.path(source))
        except CheckpointError as e:
            raise PipelineError(str(e)) from None

    def record(self, stage: str, metrics: dict) -> None:
        metrics = {**metrics, "key": self.key(stage)}
        self.summary["stages"][stage] = metrics
        if self.env.main:
            write_json(self.summary_path, self.summary)
            if self.env.writer is not None:
                self.env.writer.add_text(f"summary/{stage}", _markdown(metrics), 0)
                self.env.writer.flush()

    # ---- running ------------------------------------------------------------------------------------------
    def run(self, stages: list[str]) -> dict:
        from . import stages as stage_fns

        for stage in stages:
            if self.is_done(stage):
                if self.env.main:
                    print(f"[{stage}] done earlier, reused", file=sys.stderr)
                continue
            torch.manual_seed(self.recipe.seed)
            if self.env.main:
                print(f"[{stage}] running", file=sys.stderr)
            fn = getattr(stage_fns, stage)
            metrics = fn(self) if self.env.main or stage in stage_fns.EVERY_RANK else None
            self._barrier()
            if metrics is None:  # other ranks: read what rank 0 recorded
                self.summary = json.loads(self.summary_path.read_text())
            else:
                self.record(stage, metrics)
        return self.summary

    def _barrier(self) -> None:
        if self.env.world_size > 1:
            torch.distributed.barrier()

    def save(self, stage: str, model: nn.Module) -> None:
        if self.env.main:
            save_model(model, self.path(stage))


def _hash(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _markdown(metrics: dict) -> str:
    rows = [f"| {k} | {v} |" for k, v in metrics.items() if not isinstance(v, (list, dict))]
    return "\n".join(["| key | value |", "|---|---|", *rows])

