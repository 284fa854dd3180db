"""Run-directory state: stage keys, artifact paths, `summary.json` and the lock.

Two keys per stage, both chained through the stage it reads its model from:
- the *artifact key* hashes what its output file depends on: the seed, the weight-changing values of the recipe
  sections it reads (`RunDir.sections_read`, resolved by `Recipe.resolved`) and its input's artifact key. A
  stage the recipe skips passes its input through, key included. The artifact records it (inside the file and
  in `summary.json`), training checkpoints resume only under it, and loading an input checks it.
- the *key* adds the values that change only what is measured (`data.test_subset`, `export.eval_subset`): a
  stage whose key changed but whose artifact key did not is re-evaluated, resuming its finished training
  checkpoint.
What each recipe value changes (its role) is marked in the recipe's schema with `compress.keys`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import UserError
from .files import write_json
from .keys import KEY_SCHEME, ROLE_EVALUATION, ROLE_WEIGHTS, digest
from .recipe import Recipe
from .registry import STAGES


class PipelineError(UserError, RuntimeError):
    """A run-level problem (missing or stale input, locked run dir), said in one line."""


class RunLock:
    """One run per directory: a second concurrent run fails at once, naming the directory and the holder's pid.

    filelock 4 opens a contended lock file without truncating it, so the pid the holder writes stays readable."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / ".lock"
        self.lock = FileLock(self.path, timeout=0)

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.lock.acquire()
        except Timeout:
            holder = self.path.read_text().strip() or "unknown"
            raise PipelineError(f"run dir {self.path.parent} is in use by another run (pid {holder})") from None
        self.path.write_text(str(os.getpid()))
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()


class RunDir:
    """The state of one run directory under one (resolved) recipe."""

    def __init__(self, out_dir: Path, recipe: Recipe):
        self.out_dir, self.recipe = Path(out_dir), recipe
        self.summary_path = self.out_dir / "summary.json"
        self.summary = self.read_summary()

    def read_summary(self) -> dict:
        if not self.summary_path.exists():
            return {"recipe": self.recipe.name, "key_scheme": KEY_SCHEME, "stages": {}}
        summary = json.loads(self.summary_path.read_text())
        if summary.get("key_scheme") != KEY_SCHEME:
            raise PipelineError(f"run dir {self.out_dir} was made by an older version of this tool (its keys mean "
                                f"something else now): start a fresh run directory with --out")
        return summary

    def write_summary(self) -> None:
        write_json(self.summary_path, self.summary)

    # ---- which stage a model comes from ---------------------------------------------------------------------
    def active(self, stage: str) -> bool:
        """Whether the recipe runs `stage` (a skipped stage passes its input through)."""
        return stage in self.recipe.stages

    def source(self, stage: str | None) -> str | None:
        """The stage whose artifact stands for `stage`'s output: itself, or the nearest upstream stage the recipe
        runs that writes a model."""
        while stage is not None and not (self.active(stage) and STAGES[stage].artifact):
            stage = STAGES[stage].input
        return stage

    def path(self, stage: str) -> Path:
        return self.out_dir / STAGES[stage].artifact

    def trains(self, stage: str) -> bool:
        """Whether `stage` trains under this recipe, so that every DDP rank runs it, where rank 0 runs the others
        alone (`registry.Ranks`: a "training" stage trains when its own recipe section says so)."""
        ranks = STAGES[stage].ranks
        return ranks == "all" or (ranks == "training" and getattr(self.recipe, stage).trains)

    def sections_read(self, stage: str) -> tuple[str, ...]:
        """Every recipe section `stage` reads under this recipe."""
        spec = STAGES[stage]
        return spec.reads + (spec.reads_when_training if self.trains(stage) else ())

    # ---- keys -----------------------------------------------------------------------------------------------
    def _weight_values(self, section: str) -> dict:
        return getattr(self.recipe, section).key_values(ROLE_WEIGHTS)

    def sections(self, stage: str | None) -> dict[str, str]:
        """Hash of each recipe section (weight-changing values) that `stage`'s artifact depends on."""
        out = {"seed": digest(self.recipe.seed)}
        while stage is not None:
            if self.active(stage):
                for name in self.sections_read(stage):
                    out[name] = digest(self._weight_values(name))
            stage = STAGES[stage].input
        return out

    def artifact_key(self, stage: str | None) -> str:
        """What `stage`'s output depends on: the seed, its sections' weight-changing values, its input's key."""
        if stage is None:
            return digest(["seed", self.recipe.seed])
        spec = STAGES[stage]
        upstream = self.artifact_key(spec.input)
        if not self.active(stage):
            return upstream
        own = {name: self._weight_values(name) for name in self.sections_read(stage)}
        return digest([stage, own, upstream])

    def key(self, stage: str) -> str:
        """The artifact key plus what changes only evaluation (in `data` or the stage's own sections): a finished
        stage is reused under the same key."""
        sections = ("data", *self.sections_read(stage))
        measured = {s: getattr(self.recipe, s).key_values(ROLE_EVALUATION) for s in sections}
        return digest([self.artifact_key(stage), measured])

    def provenance(self, stage: str) -> dict:
        """What an artifact records about how it was made (in the file, and in its summary entry)."""
        return {"artifact_key": self.artifact_key(stage), "sections": self.sections(stage)}

    # ---- state ----------------------------------------------------------------------------------------------
    def entry(self, stage: str) -> dict | None:
        return self.summary["stages"].get(stage)

    def is_done(self, stage: str) -> bool:
        entry = self.entry(stage)
        produced = STAGES[stage].artifact is None or self.path(stage).exists()
        return entry is not None and entry.get("key") == self.key(stage) and produced

    def record(self, stage: str, metrics: dict) -> dict:
        """The summary entry of a finished stage: its metrics, keys and section hashes (written by the caller)."""
        entry = {**metrics, "key": self.key(stage), **self.provenance(stage)}
        self.summary["stages"][stage] = entry
        return entry

    def staleness(self, stage: str, recorded: dict | None) -> str | None:
        """Why `stage`'s artifact, made as `recorded` (its provenance, or its summary entry) says, does not belong
        to the recipe any more; None if it does."""
        recorded = recorded or {}
        if recorded.get("artifact_key") == self.artifact_key(stage):
            return None
        now, then = self.sections(stage), recorded.get("sections", {})
        changed = [name for name in now if now[name] != then.get(name)]
        what = f"{', '.join(changed)} changed" if changed else "the recipe's stages changed"
        return f"{self.path(stage).name} was made before {what}"

    def stale_upstream(self, stage: str) -> list[str]:
        """The stages, in order, whose artifacts `stage`'s output is made of (its source and every source upstream)
        and that no longer match the recipe (keys chain: once one is stale, all after it are)."""
        chain, s = [], self.source(stage)
        while s is not None:
            chain.insert(0, s)
            s = self.source(STAGES[s].input)
        return [s for s in chain if self.staleness(s, self.entry(s)) is not None]
