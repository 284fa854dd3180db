"""How well each pruning criterion and planner allocates channels, before any fine-tuning: a trained plain model
pruned to a MAC target by each cell, then its top-1 and cross-entropy on the test set (PyTorch) and the time the
criterion took. It measures the allocation's quality alone: fine-tuning would hide most of the differences.

    python benchmarks/prune_criteria.py --base runs/study_cifar10_cpu [--recipe recipes/study_cifar10_cpu.yaml]
        [--keep 0.5 0.3] [--cells l2-ranking,sensitivity,...] [--set prune.min_width=16]
        [--report docs/results/prune_criteria.md]

`--base`: a study directory (its base/plain.pt) or a run directory (its plain.pt); the recipe must be the one it was
trained with (its data and `prune` settings are used). A cell is a name from CELLS: prune settings over the recipe's
`prune` section. The sensitivity curves are cached in BASE/sensitivity.json, as the study caches them. The table is
printed; `--report PATH` also writes it as a published report (`compress.results.write_result_report`: the command,
date, CPU, threads and package versions above it)."""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from compress.data import build_data
from compress.files import build_model, load_checkpoint
from compress.prune import prune_model
from compress.recipe import load_recipe
from compress.results import write_result_report
from compress.runtime.machine import cpu_info, describe_cpu
from compress.stages.prune import prune_options

CELLS = {
    # weight magnitude, layers ranked against each other; without the re-fit (the recipe's default is on)
    "l2-ranking": {"importance": "l2", "planner": "ranking", "reconstruct": False},
    "l2-budget": {"importance": "l2", "planner": "budget", "reconstruct": False},
    "taylor": {"importance": "taylor", "planner": "budget", "reconstruct": False},
    "sensitivity": {"importance": "sensitivity", "planner": "budget", "reconstruct": False},
    "l2-ranking+reconstruct": {"importance": "l2", "planner": "ranking", "reconstruct": True},
    "taylor+reconstruct": {"importance": "taylor", "planner": "budget", "reconstruct": True},
    "sensitivity+reconstruct": {"importance": "sensitivity", "planner": "budget", "reconstruct": True},
}


def evaluate(model: torch.nn.Module, loader) -> tuple[float, float]:
    """(top-1 %, mean cross-entropy) over `loader`."""
    correct, loss, n = 0, 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            logits = model(x)
            correct += int((logits.argmax(1) == y).sum())
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            n += len(y)
    return 100 * correct / n, loss / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="a study directory (its base/) or a run directory")
    ap.add_argument("--recipe", type=Path, default=Path("recipes/study_cifar10_cpu.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.3])
    ap.add_argument("--cells", default=",".join(CELLS))
    ap.add_argument("--report", type=Path, metavar="PATH.md", help="also write the table as a published report")
    args = ap.parse_args()
    unknown = [c for c in args.cells.split(",") if c not in CELLS]
    if unknown:
        ap.error(f"--cells: unknown {', '.join(unknown)} (cells: {', '.join(CELLS)})")
    recipe = load_recipe(args.recipe, args.overrides).resolved("cpu")
    torch.manual_seed(recipe.seed)
    data = build_data(recipe.data, recipe.seed)
    base_dir = args.base / "base" if (args.base / "base").exists() else args.base
    unpruned = build_model(load_checkpoint(base_dir / "plain.pt")).eval()
    example = data.example_input()
    test = data.test_loader()
    cfg = recipe.prune
    images = max(cfg.gradient_batches * recipe.data.batch_size, cfg.sensitivity_images, cfg.reconstruct_images)
    batches = list(data.calibration_loader(images))
    top1, loss = evaluate(unpruned, test)
    machine = {**cpu_info(), "threads": torch.get_num_threads()}
    print(f"{describe_cpu(machine)}; torch threads {machine['threads']}", file=sys.stderr)
    rows = [f"| unpruned | 1 | {top1:.2f} | {loss:.3f} | - | - |"]
    for keep in args.keep:
        for cell in args.cells.split(","):
            settings = {**CELLS[cell], "keep_macs": keep, "sensitivity_cache": args.base / "sensitivity.json"}
            options = prune_options(cfg.model_copy(update=settings))
            model = copy.deepcopy(unpruned)
            began = time.perf_counter()
            report = prune_model(model, options, example, batches=batches)
            seconds = time.perf_counter() - began
            top1, loss = evaluate(model.eval(), test)
            rows.append(f"| {cell} | {keep:g} | {top1:.2f} | {loss:.3f} | {seconds:.0f} s | "
                        f"{', '.join(map(str, report['widths_after']))} |")
            print(rows[-1], file=sys.stderr)
    table = "\n".join(["| cell | keep_macs | top-1 before fine-tuning | test loss | prune time | widths |",
                       "|---|---|---|---|---|---|", *rows])
    print(table)
    if args.report:
        body = (f"The trained plain model of {base_dir} ({recipe.name}) pruned to each MAC target by each criterion "
                "and planner, then scored on the test set in PyTorch with no fine-tuning: the allocation's quality "
                "alone.\n\n" + table)
        print(f"report: {write_result_report(args.report, 'Pruning criteria before fine-tuning', body, machine=machine)}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
