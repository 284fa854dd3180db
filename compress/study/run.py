"""The study's orchestration: the base, every point, one benchmark of all their files, then the report."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import torch_pruning as tp
from torch.utils.tensorboard import SummaryWriter

from repvgg import channel_groups

from ..bench import benchmark
from ..context import StageContext
from ..data import Data
from ..env import Env
from ..files import write_json
from ..models import recipe_architecture
from ..pipeline import Pipeline
from ..prune import default_round_to
from ..recipe import Recipe
from ..record import run_record
from ..stages.bench import bench_options
from .analysis import PRECISIONS, ROUND_STATISTIC, compare, correctness, point_row, seed_differences
from .budget import (
    PRUNED,
    RESREP,
    SCRATCH,
    finetune_with,
    latency_matched_widths,
    resrep_verdict,
    scratch_with,
    verdict,
    with_side,
)
from .points import (
    base_recipe,
    check_base_dir,
    point_name,
    pruned_images,
    pruned_recipe,
    reseeded,
    resrep_twin,
    scratch_recipe,
    scratch_widths,
    seed_from_base,
    unpruned_recipe,
)
from .report import write_report
from .strategies import STRATEGIES, strategy_keeps


class Study:
    """A recipe with a `study` section: every strategy's points on one base, benchmarked and compared."""

    def __init__(self, recipe: Recipe, out_dir: Path, env: Env, data: Data):
        self.recipe, self.out_dir, self.env, self.data = recipe, Path(out_dir), env, data
        self.example = data.example_input().to(env.device)
        self.unit = recipe.prune.round_to or default_round_to(env.device.type)
        self.num_blocks = list(recipe_architecture(recipe, data.num_classes).num_blocks)
        self.timings_path = self.out_dir / "timings.json"
        self.timings = json.loads(self.timings_path.read_text()) if self.timings_path.exists() else {}

    def _timed(self, phase: str, fn, fresh: bool):
        """Run `fn`; when it had work to do (`fresh`), record its wall time under `phase` (DIR/timings.json)."""
        began = time.perf_counter()
        result = fn()
        if fresh and self.env.main:
            self.timings[phase] = round(time.perf_counter() - began, 1)
            write_json(self.timings_path, self.timings)
        return result

    def _run(self, recipe: Recipe, out_dir: Path, base: StageContext | None = None) -> StageContext:
        """One point as an ordinary pipeline run of its recipe's stages, with TensorBoard logs of its own
        (DIR/points/<p>/tb); `base` gives it the shared trained model first. Returns the run's context."""
        writer = SummaryWriter(str(out_dir / "tb")) if self.env.main else None
        try:
            # a scratch point's own seed (`study.seeds`) and training images (the prune-or-retrain curve's)
            data = self.data.reseeded(recipe.seed).with_train_subset(recipe.data.train_subset)
            pipeline = Pipeline(recipe, out_dir, dataclasses.replace(self.env, writer=writer), data)
            run = pipeline.context
            if base is not None:
                if self.env.main:
                    seed_from_base(base, run)
                run.wait_for_main()
            fresh = not all(run.dir.is_done(s) for s in recipe.stages)
            phase = out_dir.name if out_dir.parent == self.out_dir else f"points/{out_dir.name}"
            self._timed(phase, lambda: pipeline.run(recipe.stages), fresh)
        finally:
            if writer is not None:
                writer.close()
        return run

    def _reader(self, recipe: Recipe, out_dir: Path) -> StageContext:
        """A finished run read in place (`study.base_dir`'s), never written."""
        return StageContext(recipe, out_dir, dataclasses.replace(self.env, writer=None), self.data)

    def base(self) -> StageContext:
        """The trained base: `study.base_dir`'s, checked against this recipe, or trained here in DIR/base."""
        if self.recipe.study.base_dir is not None:
            checked = check_base_dir(self.recipe, self.recipe.study.base_dir)
            return self._reader(base_recipe(self.recipe), checked.out_dir)
        return self._run(base_recipe(self.recipe), self.out_dir / "base")

    def _shared_point(self, recipe: Recipe, name: str) -> StageContext | None:
        """`study.base_dir`'s study's point `name`, when it was finished under this recipe's keys."""
        shared = self.recipe.study.base_dir and Path(self.recipe.study.base_dir) / "points" / name
        if not shared or not (shared / "summary.json").exists():
            return None
        other = self._reader(recipe, shared)
        return other if all(other.dir.is_done(s) for s in recipe.stages) else None

    def _point(self, strategy: str, keep: float, recipe: Recipe, base: StageContext, images: int,
               seed: int = 0, name: str | None = None) -> dict:
        name = name or ("unpruned" if strategy == "unpruned" else point_name(strategy, keep, seed))
        run = self._shared_point(recipe, name)
        if self.env.main:
            print(f"[study] {name}" + (f": reused from {run.out_dir}" if run else ""), file=sys.stderr)
        if run is None:
            from_scratch = strategy == SCRATCH or (strategy in STRATEGIES and STRATEGIES[strategy].from_scratch)
            run = self._run(recipe, self.out_dir / "points" / name, None if from_scratch else base)
        return {"strategy": strategy, "keep": keep, "seed": seed, "tag": name, "run": run, "images_seen": images}

    def points(self) -> list[dict]:
        r, cfg = self.recipe, self.recipe.study
        base = self.base_run = self.base()
        base_images, ft_images = pruned_images(r, self.data)
        points = [self._point("unpruned", 1.0, unpruned_recipe(r), base, base_images)]
        for strategy in cfg.strategies:
            from_scratch = STRATEGIES[strategy].from_scratch
            for keep in strategy_keeps(cfg, strategy):
                if from_scratch:
                    widths = scratch_widths(r, keep, self.data.num_classes, self.example.cpu(), self.unit)
                    teacher = base.dir.path("reparam").resolve() if cfg.scratch_distill else None
                    precipe = scratch_recipe(r, widths, self.data, teacher)
                    images = precipe.train.epochs * self.data.images_per_epoch()
                else:
                    precipe, images = pruned_recipe(r, strategy, keep), base_images + ft_images
                for seed in range(cfg.seeds):
                    points.append(self._point(strategy, keep, reseeded(precipe, seed, from_scratch), base, images,
                                              seed))
        return points

    def budget_points(self) -> list[dict]:
        """The prune-or-retrain curve's points (`compress.study.budget`), after `points` (it reads the base); none
        without `study.added_images`."""
        r, cfg = self.recipe, self.recipe.study
        if not cfg.added_images:
            return []
        base, points = self.base_run, []
        base_images, ft_images = pruned_images(r, self.data)
        pruned = pruned_recipe(r, "plain-latency", cfg.budget_keep_latency)
        # the pruned side, then (`study.budget_resrep`) ResRep to the same latency target on the same added images
        sides = [(PRUNED, lambda recipe: recipe), *([(RESREP, resrep_twin)] if cfg.budget_resrep else [])]
        for side, as_side in sides:
            for added in cfg.added_images:
                precipe = as_side(finetune_with(pruned, added, self.data))
                images = pruned_images(precipe, self.data)[1]
                for seed in range(cfg.seeds):
                    tag = f"{side}_add{added}" + (f"_seed{seed}" if seed else "")
                    pt = self._point(side, cfg.budget_keep_latency, reseeded(precipe, seed, False), base,
                                     base_images + images, seed, tag)
                    points.append(with_side(pt, side, images))
        widths, self.budget_match = self._matched_widths(points[0]["run"])
        teacher = base.dir.path("reparam").resolve() if cfg.scratch_distill else None
        # None: equal total images (base plus the recipe's fine-tune)
        for added in [*cfg.added_images, *([None] if cfg.budget_equal_total else [])]:
            images = added if added is not None else base_images + ft_images
            precipe = scratch_with(r, widths, images, self.data, teacher)
            seen = precipe.train.epochs * self.data.with_train_subset(precipe.data.train_subset).images_per_epoch()
            for seed in range(cfg.seeds):
                tag = f"{SCRATCH}_{f'add{added}' if added is not None else 'total'}" + (f"_seed{seed}" if seed else "")
                pt = self._point(SCRATCH, cfg.budget_keep_latency, reseeded(precipe, seed, True), base, seen, seed,
                                 tag)
                points.append(with_side(pt, SCRATCH, seen if added is not None else None))
        return points

    def _matched_widths(self, pruned: StageContext) -> tuple[list[int], dict]:
        """The scratch side's stage widths, latency-matched to the `pruned` run's model (`latency_matched_widths`),
        kept in DIR/budget_match.json under that model's key: timed again, they could come out otherwise, and a
        rerun would then train every scratch point anew."""
        path, key = self.out_dir / "budget_match.json", pruned.dir.artifact_key("prune")
        cached = json.loads(path.read_text()) if path.exists() else {}
        if cached.get("key") == key:
            return cached["match"]["widths"], cached["match"]
        arch = recipe_architecture(self.recipe, self.data.num_classes)
        log = (lambda line: print(line, file=sys.stderr)) if self.env.main else None
        widths, match = latency_matched_widths(
            self.recipe, self.base_run.load("reparam").cpu().eval(), arch.config()["widths"], [1, *arch.num_blocks],
            pruned.summary["stages"]["prune"], self.example.shape[-1], self.unit, log=log)
        if self.env.main:
            write_json(path, {"key": key, "match": match})
        return widths, match

    def bench(self, points: list[dict]) -> dict:
        """All points' ONNX files in one alternating benchmark (ORT CPU, every `bench.batch_sizes`), cached on
        the files' identities."""
        files = {}
        for pt in points:
            for name, entry in pt["run"].summary["stages"]["export"]["artifacts"].items():
                files[f"{pt['tag']}:{name.split('_')[-1]}"] = Path(entry["path"])
        cfg = self.recipe.bench
        ident = json.dumps([[k, str(p), p.stat().st_size, p.stat().st_mtime_ns] for k, p in sorted(files.items())]
                           + [cfg.model_dump(mode="json"), ROUND_STATISTIC])  # a cache without it is timed again
        key = hashlib.sha256(ident.encode()).hexdigest()[:16]
        cache = self.out_dir / "study_bench.json"
        if cache.exists():
            cached = json.loads(cache.read_text())
            if cached.get("key") == key:
                return cached
        main_batch = cfg.main_batch or cfg.batch_sizes[0]
        options = dataclasses.replace(bench_options(cfg), main_batch=main_batch, runtimes=("cpu",))
        result = self._timed("bench", lambda: benchmark(files, options, cfg.image_size or self.data.cfg.image_size),
                             fresh=True)
        result["key"] = key
        # the command that measured the latencies: the study's report names it, also when a rerun reuses them
        result["run"] = run_record(self.recipe, self.env.device, self.env.command)
        write_json(cache, result)
        return result

    def run(self) -> dict | None:
        """Every DDP rank trains the points together; rank 0 alone benchmarks them (one benchmark at a time on
        the machine) and writes the report while the others wait. The result on rank 0, None elsewhere."""
        points = self.points()
        budget = self.budget_points()
        result = self.report(points, budget) if self.env.main else None
        points[0]["run"].wait_for_main()
        return result

    def report(self, points: list[dict], budget: list[dict] = ()) -> dict:
        """Benchmark every point, compare the strategies, then write study.md, study.json, pareto.png (and the
        prune-or-retrain figure, with `study.added_images`) and the TensorBoard figures and HParams table."""
        bench = self.bench([*points, *budget])
        timed = [r for r in bench["results"] if r["provider"] == "cpu"]
        # each round's fastest call per file, keyed (point, precision, batch): a file's latency is the fastest
        # round's (`point_row`), and the comparisons tell two points' latencies apart round by round
        rounds = {(*r["artifact"].split(":"), r["batch"]): r[ROUND_STATISTIC] for r in timed}
        def row_of(pt: dict) -> dict:
            fp32_model = pt["run"].load("finetune").cpu().eval()  # the plain model where nothing was pruned
            pt["widths"] = fp32_model.widths()
            arts = pt["run"].summary["stages"]["export"]["artifacts"]
            scored = {p: correctness(next(e for n, e in arts.items() if n.endswith(p))) for p in PRECISIONS}
            pt["correct"] = {p: correct for p, (correct, _) in scored.items()}
            pt["labels"] = scored["fp32"][1]
            macs_params = tp.utils.count_ops_and_params(fp32_model, self.example.cpu())
            return point_row(pt, rounds, macs_params, self.num_blocks)

        rows = [row_of(pt) for pt in points]
        base = self.base_run
        coupling = {
            "groups_training_time": len(channel_groups(base.load("train").eval(), self.example.cpu())),
            "groups_plain": len(channel_groups(base.load("reparam").eval(), self.example.cpu())),
        }
        batches = sorted({b for (_, _, b) in rounds}, key=lambda b: (b != bench["main_batch"], b))
        first = [(pt, row) for pt, row in zip(points, rows) if pt["seed"] == 0]  # the curves: each point's first seed
        result = {
            # the command, date and machine of the benchmark (the study's last measurement), this recipe
            "run": {**bench.get("run", run_record(self.recipe, self.env.device, self.env.command)),
                    "recipe": self.recipe.model_dump(mode="json")},
            "base": {"dir": str(base.out_dir), "top1": base.summary["stages"]["train"]["top1"]},
            "rows": rows,
            **compare(*map(list, zip(*first)), batches, self.recipe.study.bootstrap_resamples),
            "coupling": coupling,
            "machine": bench["machine"],
            "settings": {**bench["settings"], "batches": batches, "main_batch": bench["main_batch"]},
            # this study's phases only: a point the recipe no longer asks for keeps its directory and its time
            "timings": {phase: sec for phase, sec in self.timings.items()
                        if phase in {"base", "bench", *(f"points/{pt['tag']}" for pt in [*points, *budget])}},
        }
        seed_differences(rows, result["comparisons"])  # each comparison on every seed's own curves
        if budget:
            budget_rows = [with_side(row_of(pt), pt["side"], pt["added_images"]) for pt in budget]
            result["budget"] = {"rows": budget_rows, "verdict": verdict(budget_rows),
                                "verdict_int8": verdict(budget_rows, "int8"),
                                "resrep": {p: resrep_verdict(budget_rows, p) for p in PRECISIONS},
                                "match": self.budget_match,
                                "keep_latency": self.recipe.study.budget_keep_latency,
                                "equal_total": self.recipe.study.budget_equal_total}
        write_report(self.recipe, result, self.out_dir, self.env.writer)
        return result
