"""The command line, `python compress.py COMMAND ...` (also installed as `repvgg-compress`):

  run             a recipe's stages over a run directory (the default command: `compress.py --recipe R ...` is
                  `compress.py run --recipe R ...`)
  latency-table   the latency table a recipe's `prune.latency` settings ask for
  inspect         what a checkpoint or ONNX file holds
  profile         ONNX Runtime's CPU kernel times of an ONNX file
  int8-diagnosis  where a run's INT8 model loses accuracy, layer by layer
  report          a finished run's or study's report re-written from its directory (optionally into docs/results/)

Each command parses, validates once and dispatches. Every failure a user can fix (`UserError`) prints as one
`error:` line, in one place (`main`) for every command; `--debug` shows the traceback instead."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from datetime import timedelta
from pathlib import Path

import torch

from .errors import UserError
from .recipe import Recipe, RecipeError, load_recipe
from .record import invocation
from .registry import STAGE_NAMES
from .study.strategies import strategy_keeps


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


def run(args: argparse.Namespace) -> int:
    """`compress.py [run] --recipe R`: the recipe's stages, or its study, over the run directory."""
    # imported here, not at the top: the pipeline pulls in torchvision, matplotlib, TensorBoard and Torch-Pruning
    # (about 4 s), which --help, --dry-run and a recipe error never need
    from torch.utils.tensorboard import SummaryWriter

    from .data import build_data
    from .env import Env
    from .pipeline import Pipeline
    from .report import run_report
    from .rundir import RunLock
    from .study.run import Study
    from .tensorboard_log import add_text

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
                      wait_group=wait_group, command=invocation(args.argv, world_size))
            if recipe.study is not None:
                Study(recipe, out_dir, env, data).run()
                if rank == 0:
                    print((out_dir / "study.md").read_text())
                    print(f"study: {out_dir / 'study.md'}  {out_dir / 'pareto.png'}  tensorboard --logdir {out_dir / 'tb'}")
                return 0
            summary = Pipeline(recipe, out_dir, env, data).run(plan, explicit=args.stages is not None)
            if rank == 0:
                report = run_report(recipe, summary, out_dir)
                add_text(writer, "report", report)
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


def latency_table(args: argparse.Namespace) -> int:
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




def inspect(args: argparse.Namespace) -> int:
    """`compress.py inspect PATH`: what a checkpoint or ONNX file holds, without running a recipe."""
    from .describe import describe

    print("\n".join(describe(args.path, args.image_size)))
    return 0


def profile(args: argparse.Namespace) -> int:
    """`compress.py profile FILE.onnx`: ONNX Runtime's CPU kernel times of the file, per op type and per node."""
    from .profile import format_profile, profile_onnx

    print(format_profile(profile_onnx(args.path, args.threads, args.batch, args.image_size, args.runs)))
    return 0


@contextlib.contextmanager
def _nncf_log_level(level: int):
    """NNCF's log level for the block (its handler writes to stdout)."""
    from nncf.common.logging.logger import nncf_logger, set_log_level

    before = nncf_logger.level
    set_log_level(level)
    try:
        yield
    finally:
        set_log_level(before)


def _diagnosed_run(args: argparse.Namespace) -> tuple[Path, Recipe]:
    """The run directory `int8-diagnosis` works on (a study's point with --point) and its resolved recipe: the one
    it recorded; where it recorded none, --recipe with --set (for a point: the study's, the point's rebuilt from it
    as the study builds it)."""
    from .record import RecordError, provenance, read_json
    from .study.points import pruned_recipe, reseeded
    from .study.strategies import STRATEGIES

    run_dir = args.run_dir
    points = run_dir / "points"
    if args.point is not None or points.is_dir():
        if not points.is_dir():
            raise RecordError(f"--point: {run_dir} is not a study directory (no points/)")
        names = sorted(p.name for p in points.iterdir() if p.is_dir())
        if args.point not in names:
            what = "name a point with --point" if args.point is None else f"no point '{args.point}' in it"
            raise RecordError(f"{run_dir} is a study directory: {what} (points: {', '.join(names) or 'none'})")
        run_dir = points / args.point
    summary = read_json(run_dir / "summary.json")
    made = provenance(run_dir, summary, summary.get("recipe"), args.recipe, args.overrides)
    if not made.reconstructed:
        return run_dir, made.recipe  # as recorded: resolved where it ran
    recipe = made.recipe.resolved(_device(made.recipe, 0).type)
    if args.point is not None:  # a study's recipe: the point's is the study's rebuilt as the study rebuilt it
        match = re.fullmatch(r"(.+)_([0-9.]+)(?:_seed(\d+))?", args.point)
        if match is None or match[1] not in STRATEGIES or STRATEGIES[match[1]].from_scratch:
            raise RecordError(f"{run_dir} records no recipe and '{args.point}' is not a pruned point whose recipe "
                              "can be rebuilt from the study's")
        recipe = reseeded(pruned_recipe(recipe, match[1], float(match[2])), int(match[3] or 0), False)
    return run_dir, recipe


def int8_diagnosis(args: argparse.Namespace) -> int:
    """`compress.py int8-diagnosis RUN_DIR [--point NAME]`: where the run's INT8 model loses accuracy. Per layer,
    PTQ top-1 with that layer kept in FP32, and how far QAT moved each quantizer's scale from its PTQ start; the
    run's fine-tuned FP32 model and QAT model, its calibration settings, on --images test images."""
    from .data import build_data
    from .files import CheckpointError, build_model, load_checkpoint
    from .int8_diagnosis import Diagnosis, format_diagnosis, layer_losses, scale_moves
    from .quant import rebuild_quantized
    from .rundir import RunDir
    from .stages.quantize import calibration_options
    from .train import evaluate

    if args.images < 1:
        raise RecipeError(f"--images must be >= 1, got {args.images}")
    run_dir, recipe = _diagnosed_run(args)
    state = RunDir(run_dir, recipe)

    def log(line: str) -> None:
        print(line, file=sys.stderr)

    def artifact(stage: str) -> tuple[Path | None, dict | None, str | None]:
        """The file standing for `stage`'s output, its record (None: absent or not made under the recipe) and
        why it is not usable."""
        source = state.source(stage)
        path = state.path(source) if source else None
        if path is None or not path.is_file():
            return path, None, f"{path or stage + ' output'} is missing"
        record = load_checkpoint(path)
        stale = state.staleness(source, record.get("provenance") if isinstance(record, dict) else None)
        return path, (None if stale else record), stale and f"{path} does not belong to the recipe ({stale})"

    fp32_path, fp32_record, why = artifact("finetune")
    if fp32_record is None:
        raise CheckpointError(f"{why}: the FP32 model to diagnose must be the recipe's (the run's own recipe, or "
                              "--recipe/--set as it was made)")
    fp32 = build_model(fp32_record).eval()
    torch.manual_seed(recipe.seed)
    data = build_data(recipe.data, recipe.seed)
    cfg = recipe.quantize
    example = data.example_input()
    calibration = data.reseeded(cfg.seed).calibration_loader(cfg.calibration_size)  # the quantize stage's images
    test = data.test_sample_loader(args.images)
    # stdout holds the tables alone: NNCF's progress bars (stdout) go to stderr, its INFO notes are muted
    with contextlib.redirect_stdout(sys.stderr), _nncf_log_level(logging.WARNING):
        fp32_top1, ptq_top1, ptq_model, layers = layer_losses(fp32, calibration, example, test,
                                                              calibration_options(cfg), log=log)
        diagnosis = Diagnosis(f"{run_dir} ({fp32_path.name})", len(test.dataset),
                              f"overflow_fix {cfg.overflow_fix}, ranges {cfg.activation_ranges}, calibration "
                              f"{cfg.calibration_size} images", fp32_top1, ptq_top1, layers)
        if "quantize" in recipe.stages and cfg.mode == "qat":
            qat_path, qat_record, why = artifact("quantize")
            if qat_record is None:
                log(f"[int8-diagnosis] the QAT scale table is left out: {why}")
            else:
                qat = rebuild_quantized(qat_record, qat_path, example)
                diagnosis.qat_top1 = evaluate(qat, test, torch.device("cpu"))["top1"]
                diagnosis.scales = scale_moves(ptq_model, qat)
    print(format_diagnosis(diagnosis))
    return 0


def report(args: argparse.Namespace) -> int:
    """`compress.py report RUN_DIR`: the run's or study's report from its outputs on disk."""
    from .republish import republish

    text, written = republish(args.run_dir, args.to, args.title, args.recipe, args.overrides)
    print(text, end="")
    if written is not None:
        print(f"report: {written}", file=sys.stderr)
    return 0


def _recipe_arguments(ap: argparse.ArgumentParser, required: bool, what: str = "YAML recipe") -> None:
    ap.add_argument("--recipe", type=Path, required=required, help=what)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a recipe value (repeatable)")


def parser() -> argparse.ArgumentParser:
    """The parser of every command; each subparser's `handler` runs it."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="full tracebacks")
    ap = argparse.ArgumentParser(prog="compress.py", description="Compress a RepVGG by recipe. Without a command, "
                                 "`compress.py --recipe R ...` runs `compress.py run --recipe R ...`.",
                                 epilog="`compress.py COMMAND --help` describes a command's arguments.")
    commands = ap.add_subparsers(title="commands", metavar="COMMAND")

    def command(name: str, handler, summary: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=summary, description=handler.__doc__)
        sub.set_defaults(handler=handler)
        return sub

    sub = command("run", run, "run a recipe's stages (the default command)")
    _recipe_arguments(sub, required=True)
    sub.add_argument("--out", type=Path, help="run directory (default runs/<recipe name>)")
    sub.add_argument("--stages", help=f"comma-separated subset of the recipe's stages: {','.join(STAGE_NAMES)}")
    sub.add_argument("--dry-run", action="store_true", help="print the validated recipe and the stage plan")
    sub.add_argument("--resume", action="store_true",
                     help="require an existing run dir to resume (resuming is automatic when one exists)")

    sub = command("latency-table", latency_table, "print the latency table of a recipe's prune.latency settings")
    _recipe_arguments(sub, required=True)

    sub = command("inspect", inspect, "what a checkpoint or ONNX file holds")
    sub.add_argument("path", type=Path)
    sub.add_argument("--image-size", type=int, default=224, help="input size for the MACs count")

    sub = command("profile", profile, "ONNX Runtime CPU kernel times of an ONNX file")
    sub.add_argument("path", type=Path, metavar="FILE.onnx")
    sub.add_argument("--threads", type=int, help="intra-op threads (default: ORT's, all physical cores)")
    sub.add_argument("--batch", type=int, default=8)
    sub.add_argument("--image-size", type=int, help="input height and width (default: the file's, when fixed)")
    sub.add_argument("--runs", type=int, default=20, help="profiled runs, after 5 warm-up runs")

    sub = command("int8-diagnosis", int8_diagnosis, "where a run's INT8 model loses accuracy, layer by layer")
    sub.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a pipeline run directory, or a study's")
    sub.add_argument("--point", help="in a study directory: the point's name (its directory under points/)")
    sub.add_argument("--images", type=int, default=2000, help="test images each variant is scored on (stratified)")
    _recipe_arguments(sub, required=False, what="the run's recipe, where its directory records none")

    sub = command("report", report, "a finished run's or study's report, re-written from its directory")
    sub.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a pipeline run directory, or a study's")
    sub.add_argument("--to", type=Path, metavar="PATH.md",
                     help="write it as a published report (docs/results/NAME.md): header with the command that "
                          "measured it, figures copied beside it")
    sub.add_argument("--title", help="the published report's title (default: the report's own)")
    _recipe_arguments(sub, required=False, what="the run's recipe, where its directory records none")
    return ap


COMMANDS = ("run", "latency-table", "inspect", "profile", "int8-diagnosis", "report")


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default this process's), run the command, and print any `UserError` as one line."""
    args_given = argv
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["run", *argv]  # the default command: `compress.py --recipe R` keeps working
    args = parser().parse_args(argv)
    # the command as typed, recorded by a run: this process's own argv, or compress.py with the given arguments
    args.argv = None if args_given is None else list(args_given)
    try:
        return args.handler(args)
    except UserError as e:  # expected failures are one line; --debug shows the traceback
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
