"""`python compress.py --recipe R [--out DIR] [--set k=v ...] [--stages a,b] [--dry-run]`,
`python compress.py latency-table --recipe R [--set k=v ...]`, `python compress.py inspect PATH` and
`python compress.py profile FILE.onnx [--threads N] [--batch B] [--image-size S] [--runs R]` (also installed as
`repvgg-compress`). Parse, validate once, dispatch; every expected failure is one line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch

from .errors import UserError
from .recipe import Recipe, RecipeError, load_recipe
from .registry import STAGE_NAMES
from .study.strategies import strategy_keeps


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="compress.py", description=__doc__)
    ap.add_argument("--recipe", type=Path, help="YAML recipe")
    ap.add_argument("--out", type=Path, help="run directory (default runs/<recipe name>)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a recipe value (repeatable)")
    ap.add_argument("--stages", help=f"comma-separated subset of the recipe's stages: {','.join(STAGE_NAMES)}")
    ap.add_argument("--dry-run", action="store_true", help="print the validated recipe and the stage plan")
    ap.add_argument("--resume", action="store_true",
                    help="require an existing run dir to resume (resuming is automatic when one exists)")
    ap.add_argument("--debug", action="store_true", help="full tracebacks")
    return ap


def _stage_plan(recipe: Recipe, stages_arg: str | None) -> list[str]:
    if stages_arg is None:
        return recipe.stages
    asked = [s.strip() for s in stages_arg.split(",") if s.strip()]
    for s in asked:
        if s not in STAGE_NAMES:
            raise RecipeError(f"--stages: unknown stage '{s}' (stages: {', '.join(STAGE_NAMES)})")
        if s not in recipe.stages:  # a stage the recipe skips passes its input through: it has no output of its own
            raise RecipeError(f"--stages: '{s}' is not among the recipe's stages ({', '.join(recipe.stages)})")
    return [s for s in recipe.stages if s in asked]


def _device(recipe: Recipe, local_rank: int) -> torch.device:
    if recipe.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("device: cuda asked for but no CUDA device is available")
    if recipe.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def run(args) -> int:
    # imported here, not at the top: the pipeline pulls in torchvision, matplotlib, TensorBoard and Torch-Pruning
    # (about 4 s), which --help, --dry-run and a recipe error never need
    from torch.utils.tensorboard import SummaryWriter

    from .data import build_data
    from .env import Env
    from .pipeline import Pipeline
    from .report import run_report
    from .rundir import RunLock
    from .study.run import Study

    recipe = load_recipe(args.recipe, args.overrides)
    plan = _stage_plan(recipe, args.stages)
    out_dir = args.out or Path("runs") / recipe.name
    if args.dry_run:  # resolved as the run resolves it (for the device it asks for), so that what passes here runs
        recipe = recipe.resolved("cuda" if recipe.device == "cuda" else _device(recipe, 0).type)
        print(json.dumps(recipe.model_dump(mode="json"), indent=2))
        if recipe.study is not None:
            study = recipe.study
            keeps = {s: strategy_keeps(study, s) for s in study.strategies}
            plan = [f"study over each strategy's keep fractions {keeps}"
                    + (f" x {study.seeds} seeds" if study.seeds > 1 else "")
                    + (f"; prune or retrain at keep_latency {study.budget_keep_latency:g} on added images "
                       f"{study.added_images}" + (", and scratch at equal total images" if study.budget_equal_total
                                                  else "") if study.added_images else "")]
        print(f"plan: {' -> '.join(plan)}  (run dir {out_dir})")
        return 0
    if args.resume and not (out_dir / "summary.json").exists() and not any(out_dir.glob("*.ckpt")):
        raise RecipeError(f"--resume: nothing to resume in {out_dir}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(recipe, local_rank)
    recipe = recipe.resolved(device.type)
    wait_group = None
    if world_size > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeouts = recipe.distributed
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=timedelta(seconds=timeouts.timeout_s))
        wait_group = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=timeouts.wait_timeout_s))
    torch.manual_seed(recipe.seed)
    data = build_data(recipe.data, recipe.seed, rank, world_size)
    recipe = _resolve_stems(recipe, data.num_classes, device.type, rank, world_size)
    try:
        with contextlib.ExitStack() as stack:
            writer = None
            if rank == 0:  # only rank 0 writes: it holds the run dir's lock and the TensorBoard writer
                stack.enter_context(RunLock(out_dir))
                writer = SummaryWriter(str(out_dir / "tb"))
                stack.callback(writer.close)
            env = Env(device=device, out_dir=out_dir, rank=rank, world_size=world_size, writer=writer,
                      wait_group=wait_group)
            if recipe.study is not None:
                Study(recipe, out_dir, env, data).run()
                if rank == 0:
                    print((out_dir / "study.md").read_text())
                    print(f"study: {out_dir / 'study.md'}  {out_dir / 'pareto.png'}  tensorboard --logdir {out_dir / 'tb'}")
                return 0
            summary = Pipeline(recipe, out_dir, env, data).run(plan, explicit=args.stages is not None)
            if rank == 0:
                report = run_report(recipe, summary, out_dir)
                writer.add_text("report", report, 0)
                print(report, end="")
                print(f"report: {out_dir / 'report.md'}   summary: {out_dir / 'summary.json'}")
    finally:
        if world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def _resolve_stems(recipe: Recipe, num_classes: int, device_type: str, rank: int, world_size: int) -> Recipe:
    """`export.stem` / `stem_fp32` "auto" resolved (`compress.stem_choice`): timed on rank 0 alone, its recipe
    broadcast, so every rank keys the same choice."""
    if "auto" not in (recipe.export.stem, recipe.export.stem_fp32):
        return recipe
    from .models import initial_model, recipe_architecture
    from .prune.slots import plain_specs
    from .stem_choice import resolve_stems

    resolved = [None]
    if rank == 0:
        classes = recipe.model.num_classes or num_classes
        model = recipe_architecture(recipe, classes) or initial_model(recipe, classes)[0]
        resolved[0] = resolve_stems(recipe, plain_specs(model)[0], device_type,
                                    log=lambda line: print(line, file=sys.stderr))
    if world_size > 1:
        torch.distributed.broadcast_object_list(resolved, src=0)
    return resolved[0]


def latency_table_main(args) -> int:
    """`compress.py latency-table --recipe R`: build (or read from the cache) and print the latency table the
    recipe's `prune.latency` settings ask for, for the recipe's starting model (random weights do: latency does
    not depend on them)."""
    from .models import initial_model, recipe_architecture
    from .prune import print_latency_table
    from .stages.prune import latency_options, resolve_provider

    recipe = load_recipe(args.recipe, args.overrides)
    device_type = _device(recipe, 0).type
    recipe = recipe.resolved(device_type)
    classes = recipe.model.num_classes or 1000  # the head is not in the table
    recipe = _resolve_stems(recipe, classes, device_type, 0, 1)  # the table times the stem the export writes
    model = recipe_architecture(recipe, classes) or initial_model(recipe, classes)[0]
    options, _ = resolve_provider(latency_options(recipe.prune.latency), model,
                                  recipe.data.image_size, log=lambda line: print(line, file=sys.stderr))
    print_latency_table(model, options, recipe.data.image_size, recipe.prune.round_to)
    return 0


def profile_main(argv: list[str]) -> int:
    """`compress.py profile FILE.onnx`: ONNX Runtime's CPU kernel times of the file, per op type and per node."""
    from .profile import format_profile, profile_onnx

    ap = argparse.ArgumentParser(prog="compress.py profile", description=profile_main.__doc__)
    ap.add_argument("path", type=Path, metavar="FILE.onnx")
    ap.add_argument("--threads", type=int, help="intra-op threads (default: ORT's, all physical cores)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, help="input height and width (default: the file's, when fixed)")
    ap.add_argument("--runs", type=int, default=20, help="profiled runs, after 5 warm-up runs")
    ap.add_argument("--debug", action="store_true", help="full tracebacks")
    args = ap.parse_args(argv)
    try:
        result = profile_onnx(args.path, args.threads, args.batch, args.image_size, args.runs)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_profile(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["inspect"]:
        from .describe import inspect_main

        return inspect_main(argv[1:])
    if argv[:1] == ["profile"]:
        return profile_main(argv[1:])
    latency_table = argv[:1] == ["latency-table"]
    args = _parser().parse_args(argv[1:] if latency_table else argv)
    if args.recipe is None:
        _parser().error("--recipe is required")
    try:
        return latency_table_main(args) if latency_table else run(args)
    except UserError as e:  # expected failures are one line; --debug shows the traceback
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
