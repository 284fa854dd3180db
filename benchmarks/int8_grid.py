"""INT8 settings on one finished study point, one factor at a time: each cell re-runs only the point's quantize and
export stages (its fine-tuned FP32 model is shared) with some `quantize` settings changed, and reports the exported
files' FP32 and INT8 top-1 (ONNX Runtime, the point's test set), PTQ and QAT top-1 in PyTorch, and the INT8 parity.

    python benchmarks/int8_grid.py --study runs/study_cifar10_cpu --point plain_0.3 [--cells baseline,lr=1e-4,...]
        [--out runs/int8_grid]

A cell is `name` from CELLS or `key=value[;key=value]` of the `quantize` section. The point's recipe is rebuilt from
the study's recipe (`--recipe`, default the study's recipes/<name>.yaml, with `--set` as the study ran it)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

from compress.data import Data, build_data
from compress.env import Env
from compress.pipeline import Pipeline
from compress.recipe import Recipe, load_recipe, validate_recipe
from compress.study.points import pruned_recipe

# today's study settings (before the issue), then one factor changed at a time
BASELINE = {"overflow_fix": "enable"}
CELLS = {
    "baseline": {},
    "overflow_fix=disable": {"overflow_fix": "disable"},
    "calibration=2048": {"calibration_size": 2048},
    "per-sample stats": {"batchwise_statistics": False},
    "ranges=minmax": {"activation_ranges": "minmax"},
    "ranges=mean_quantile": {"activation_ranges": "mean_quantile"},
    "ranges=histogram": {"activation_ranges": "histogram"},
    "adam lr=1e-4": {"optimizer": "adamw", "lr": 1e-4},
    "lr=1e-4": {"lr": 1e-4},
    "lr=1e-5": {"lr": 1e-5},
    "epochs=3": {"epochs": 3},
    "ptq": {"mode": "ptq"},
}
SHARED = ("train", "reparam", "prune", "finetune")  # the point's stages every cell reuses


def point_arguments(ap: argparse.ArgumentParser) -> None:
    """The arguments that name a finished study point and the recipe it was made with."""
    ap.add_argument("--study", type=Path, required=True)
    ap.add_argument("--point", required=True, help="a point directory's name, e.g. plain_0.3")
    ap.add_argument("--recipe", type=Path, help="the study's recipe (default recipes/<study dir name>.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="as the study ran it")


def point_setup(args: argparse.Namespace) -> tuple[Recipe, Data]:
    """The point's recipe, rebuilt as the study made it, and its data."""
    recipe = load_recipe(args.recipe or Path("recipes") / f"{args.study.name}.yaml", args.overrides).resolved("cpu")
    strategy, keep = args.point.rsplit("_", 1)
    point = pruned_recipe(recipe, strategy, float(keep))
    torch.manual_seed(point.seed)
    return point, build_data(point.data, point.seed)


def cell_settings(cell: str) -> dict:
    if cell in CELLS:
        return {**BASELINE, **CELLS[cell]}
    settings = dict(BASELINE)
    for pair in cell.split(";"):
        key, value = pair.split("=", 1)
        settings[key] = yaml.safe_load(value)
    return settings


def seed_cell(point: Path, cell_dir: Path) -> None:
    """The point's artifacts up to fine-tuning, linked into the cell's run directory with their summary entries."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    summary = json.loads((point / "summary.json").read_text())
    summary["stages"] = {s: e for s, e in summary["stages"].items() if s in SHARED}
    for name in ("train.pt", "plain.pt", "pruned.pt", "finetuned.pt"):
        target = cell_dir / name
        if not target.exists():
            try:
                os.link(point / name, target)
            except OSError:
                shutil.copy2(point / name, target)
    if not (cell_dir / "summary.json").exists():
        (cell_dir / "summary.json").write_text(json.dumps(summary))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    point_arguments(ap)
    ap.add_argument("--cells", default=",".join(CELLS))
    ap.add_argument("--out", type=Path, default=Path("runs/int8_grid"))
    args = ap.parse_args()
    point_recipe, data = point_setup(args)
    rows = []
    for cell in args.cells.split(","):
        raw = point_recipe.model_dump(mode="json")
        raw["quantize"].update(cell_settings(cell))
        raw["export"]["int8_agreement"] = 0.01  # measured and reported here, not a gate
        cell_recipe = validate_recipe(raw)
        cell_dir = args.out / f"{args.study.name}_{args.point}" / cell.replace("/", "_")
        seed_cell(args.study / "points" / args.point, cell_dir)
        began = time.perf_counter()
        print(f"[grid] {cell}: {cell_settings(cell)}", file=sys.stderr)
        summary = Pipeline(cell_recipe, cell_dir, Env(torch.device("cpu"), cell_dir), data).run(cell_recipe.stages)
        stages = summary["stages"]
        arts = stages["export"]["artifacts"]
        parity = arts["pruned_int8"]["int8_parity"]["cpu"]
        rows.append({"cell": cell, "fp32": arts["pruned_fp32"]["top1"], "int8": arts["pruned_int8"]["top1"],
                     "ptq": stages["quantize"]["ptq_top1"], "qat": stages["quantize"]["top1"],
                     "agreement": parity["agreement"], "seconds": time.perf_counter() - began})
    print(f"| {args.point} | FP32 (ONNX) | INT8 (ONNX) | "
          "INT8 - FP32 | PTQ (PyTorch) | QAT (PyTorch) | same class, ORT vs fake-quant | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        qat = "-" if r["cell"] == "ptq" else f"{r['qat']:.2f}"
        print(f"| {r['cell']} | {r['fp32']:.2f} | {r['int8']:.2f} | {r['int8'] - r['fp32']:+.2f} | {r['ptq']:.2f} | "
              f"{qat} | {100 * r['agreement']:.1f}% | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
