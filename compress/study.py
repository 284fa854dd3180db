"""The study: why multi-branch models resist pruning, as accuracy-latency curves of exported models.

One trained multi-branch model (DIR/base) is shared by every strategy; each (strategy, keep_macs) point is an
ordinary pipeline run in DIR/points/<strategy>_<keep>, so a finished point is reused on a rerun. All points'
ONNX files are then benchmarked together, alternated in one session-at-a-time loop, so their latencies are
comparable. Strategies:

- plain: reparam -> prune each layer by global importance -> fine-tune
- plain-uniform: the same with one ratio for every layer (local scope)
- plain-rebranch: plain pruning, fine-tuned as RepVGG blocks re-branched at the pruned widths, folded back
- plain-latency: plain pruning to a fraction of the plain model's measured FP32 latency (batch 8) instead of
  its MACs, from a per-layer latency table of this machine
- multibranch: prune the training-time model (identity branches couple each stage) -> fine-tune -> reparam
- scratch: a RepVGG with stage widths scaled to the same MACs, trained from scratch for train + fine-tune epochs
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch_pruning as tp  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from repvgg import PlainRepVGG, RepVGG, channel_groups  # noqa: E402

from .bench import benchmark  # noqa: E402
from .data import Data  # noqa: E402
from .io import write_json, write_text  # noqa: E402
from .models import recipe_architecture  # noqa: E402
from .pipeline import Pipeline  # noqa: E402
from .recipe import PRUNE_TARGETS, Recipe, default_round_to  # noqa: E402
from .registry import STAGE_NAMES  # noqa: E402
from .train import Env  # noqa: E402

# plain-latency points: fractions of the FP32 latency at batch 8, so they sit at latencies comparable to the others'
LATENCY_POINTS = {"precision": "fp32", "batch": 8}
STYLE = {"plain": "#1f77b4", "plain-uniform": "#2ca02c", "plain-latency": "#ff7f0e", "plain-rebranch": "#17becf", "multibranch": "#d62728",
         "scratch": "#9467bd", "unpruned": "#000000"}


def _updated(recipe: Recipe, **sections) -> Recipe:
    """A copy of the recipe with some sections' fields replaced (validated like the original)."""
    raw = recipe.model_dump(mode="json")
    for section, fields in sections.items():
        if isinstance(fields, dict):
            raw[section] = {**(raw.get(section) or {}), **fields}
        else:
            raw[section] = fields
    raw["study"] = None
    return Recipe.model_validate(raw)


def _seed_from_base(base: Pipeline, point: Pipeline) -> None:
    """Give a point the shared trained model: the base's train and reparam artifacts linked in and their summary
    entries copied. Their keys are the point's too: the point recipe differs from the base's only in sections
    those stages do not read."""
    for stage in ("train", "reparam"):
        if point.dir.is_done(stage):
            continue
        if base.dir.key(stage) != point.dir.key(stage):
            raise RuntimeError(f"study: the point {point.out_dir.name} would not reuse the base's {stage} stage")
        target = point.dir.path(stage)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        try:
            target.hardlink_to(base.dir.path(stage))
        except OSError:
            shutil.copy2(base.dir.path(stage), target)
        point.summary["stages"][stage] = base.summary["stages"][stage]
    point.dir.write_summary()


def scratch_widths(recipe: Recipe, keep: float, num_classes: int, example: torch.Tensor, unit: int) -> list[int]:
    """Stage widths of the recipe's architecture scaled by one factor so the plain model has `keep` of its MACs
    (widths multiples of `unit`, as pruning rounds them)."""
    ref = recipe_architecture(recipe, num_classes)
    base_widths = ref.config()["widths"]

    def macs(widths) -> float:
        model = RepVGG(ref.num_blocks, widths=widths, num_classes=num_classes, stem_stride=ref.stem_stride,
                       override_groups_map=ref.override_groups_map)
        plain = PlainRepVGG([b.spec for b in model.blocks()], num_classes)
        return tp.utils.count_ops_and_params(plain, example)[0]

    def scaled(f: float) -> list[int]:
        return [max(unit, int(round(w * f / unit)) * unit) for w in base_widths]

    target = keep * macs(base_widths)
    lo, hi = 0.0, 1.0
    for _ in range(30):  # MACs grow with the factor: bisect, then keep the closest rounded widths seen
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs(scaled(mid)) < target else (lo, mid)
    candidates = {tuple(scaled(f)) for f in (lo, hi)}
    return list(min(candidates, key=lambda w: abs(macs(list(w)) - target)))


class Study:
    def __init__(self, recipe: Recipe, out_dir: Path, env: Env, data: Data):
        self.recipe, self.out_dir, self.env, self.data = recipe, Path(out_dir), env, data
        self.example = data.example_input().to(env.device)
        self.unit = recipe.prune.round_to or default_round_to(env.device.type)
        self.num_blocks = recipe_architecture(recipe, data.num_classes).num_blocks

    def _run(self, recipe: Recipe, out_dir: Path, base: Pipeline | None = None) -> Pipeline:
        """One point as an ordinary pipeline run of its recipe's stages, with TensorBoard logs of its own
        (DIR/points/<p>/tb); `base` gives it the shared trained model first."""
        writer = SummaryWriter(str(out_dir / "tb")) if self.env.main else None
        try:
            pipeline = Pipeline(recipe, out_dir, dataclasses.replace(self.env, writer=writer), self.data)
            if base is not None:
                if self.env.main:
                    _seed_from_base(base, pipeline)
                pipeline.wait_for_main()
            pipeline.run(recipe.stages)
        finally:
            if writer is not None:
                writer.close()
        return pipeline

    def points(self) -> list[dict]:
        r, cfg = self.recipe, self.recipe.study
        base_recipe = _updated(r, stages=["train", "reparam"])
        base = self._run(base_recipe, self.out_dir / "base")
        points = []
        # the unpruned reference: plain model, FP32 and INT8
        ref = _updated(r, stages=["train", "reparam", "quantize", "export"],
                       export={"artifacts": ["plain_fp32", "plain_int8"]})
        points.append({"strategy": "unpruned", "keep_macs": 1.0,
                       "run": self._run(ref, self.out_dir / "points" / "unpruned", base)})
        for strategy in cfg.strategies:
            for keep in cfg.keep_macs:
                point_dir = self.out_dir / "points" / f"{strategy}_{keep:g}"
                if strategy == "scratch":
                    widths = scratch_widths(r, keep, self.data.num_classes, self.example.cpu(), self.unit)
                    arch = recipe_architecture(r, self.data.num_classes)
                    model = {"name": None, "num_blocks": arch.num_blocks, "width_multiplier": None, "widths": widths,
                             "override_groups_map": arch.override_groups_map or None, "checkpoint": None}
                    epochs = r.train.epochs + r.finetune.epochs
                    precipe = _updated(r, model=model, train={"epochs": epochs},
                                       stages=["train", "reparam", "quantize", "export"],
                                       export={"artifacts": ["plain_fp32", "plain_int8"]})
                    seed = None
                else:
                    prune = {**dict.fromkeys(PRUNE_TARGETS), "keep_macs": keep,
                             "mode": "multibranch" if strategy == "multibranch" else "plain",
                             "scope": "local" if strategy == "plain-uniform" else r.prune.scope}
                    if strategy == "plain-latency":  # the same fraction of the plain model's measured latency
                        prune.update(keep_macs=None, keep_latency=keep,
                                     latency={**r.prune.latency.model_dump(mode="json"), **LATENCY_POINTS})
                    # plain-rebranch fine-tunes re-branched blocks; a multibranch model has its own branches
                    structure = {"plain-rebranch": "rebranch", "multibranch": "plain"}.get(strategy,
                                                                                           r.finetune.structure)
                    if structure == "rebranch" and strategy != "plain-rebranch":
                        structure = "bn"  # the recipe's rebranch is what plain-rebranch measures: others keep bn
                    precipe = _updated(r, prune=prune, finetune={"structure": structure},
                                       stages=[s for s in STAGE_NAMES if s != "bench"],
                                       export={"artifacts": ["pruned_fp32", "pruned_int8"]})
                    seed = base
                if self.env.main:
                    print(f"[study] {strategy} keep_macs={keep:g}", file=sys.stderr)
                points.append({"strategy": strategy, "keep_macs": keep, "run": self._run(precipe, point_dir, seed)})
        return points

    def bench(self, points: list[dict]) -> dict:
        """All points' ONNX files in one alternating benchmark, cached on the files' identities."""
        files = {}
        for pt in points:
            for name, entry in pt["run"].summary["stages"]["export"]["artifacts"].items():
                files[f"{pt['strategy']}_{pt['keep_macs']:g}:{name.split('_')[-1]}"] = Path(entry["path"])
        cfg = self.recipe.bench
        ident = json.dumps([[k, str(p), p.stat().st_size, p.stat().st_mtime_ns] for k, p in sorted(files.items())]
                           + [cfg.model_dump(mode="json")])
        key = hashlib.sha256(ident.encode()).hexdigest()[:16]
        cache = self.out_dir / "study_bench.json"
        if cache.exists():
            cached = json.loads(cache.read_text())
            if cached.get("key") == key:
                return cached
        main_batch = cfg.main_batch or cfg.batch_sizes[0]
        result = benchmark(files, cfg.model_copy(update={"batch_sizes": [main_batch], "main_batch": main_batch,
                                                         "providers": ["cpu"]}),
                           cfg.image_size or self.data.cfg.image_size)
        result["key"] = key
        write_json(cache, result)
        return result

    def table(self, points: list[dict], bench: dict) -> list[dict]:
        latency = {r["artifact"]: r["median_ms"] for r in bench["results"]}
        rows = []
        for pt in points:
            stages = pt["run"].summary["stages"]
            arts = stages["export"]["artifacts"]
            fp32 = next(n for n in arts if n.endswith("fp32"))
            int8 = next(n for n in arts if n.endswith("int8"))
            fp32_model = pt["run"].load("finetune")  # falls back to the plain model where nothing was pruned
            macs, params = tp.utils.count_ops_and_params(fp32_model.cpu().eval(), self.example.cpu())
            tag = f"{pt['strategy']}_{pt['keep_macs']:g}"
            row = {
                "strategy": pt["strategy"],
                "keep_macs": pt["keep_macs"],
                "macs_M": macs / 1e6,
                "params_M": params / 1e6,
                "fp32_ms": latency[f"{tag}:fp32"],
                "int8_ms": latency[f"{tag}:int8"],
                "fp32_top1": arts[fp32]["top1"],
                "int8_top1": arts[int8]["top1"],
                "widths": fp32_model.widths(),
            }
            if pt["strategy"] == "multibranch":  # the coupling forces one width per stage: its first block's
                first = [0, *itertools.accumulate([1, *self.num_blocks[:-1]])]
                row["stage_widths"] = [stages["prune"]["widths_after"][i] for i in first]
            rows.append(row)
        return rows

    def run(self) -> dict | None:
        """Every DDP rank trains the points together; rank 0 alone benchmarks them (one benchmark at a time on
        the machine) and writes the report while the others wait. The result on rank 0, None elsewhere."""
        points = self.points()
        result = self.report(points) if self.env.main else None
        points[0]["run"].wait_for_main()
        return result

    def report(self, points: list[dict]) -> dict:
        """Benchmark every point, then write study.md, study.json, pareto.png and the TensorBoard figure."""
        bench = self.bench(points)
        rows = self.table(points, bench)
        base = points[0]["run"]
        train_model = base.load("train").eval()
        plain_model = base.load("reparam").eval()
        coupling = {
            "groups_training_time": len(channel_groups(train_model, self.example.cpu())),
            "groups_plain": len(channel_groups(plain_model, self.example.cpu())),
        }
        result = {"rows": rows, "coupling": coupling, "machine": bench["machine"],
                  "settings": {**bench["settings"], "batch": bench["main_batch"]}}
        write_text(self.out_dir / "study.md", study_markdown(self.recipe, result))
        fig = pareto_figure(rows)
        fig.savefig(self.out_dir / "pareto.png", dpi=120)
        write_json(self.out_dir / "study.json", result)
        if self.env.writer is not None:
            log_tensorboard(self.env.writer, rows, fig)
        plt.close(fig)
        return result


def pareto_figure(rows: list[dict]):
    fig, ax = plt.subplots(figsize=(8, 5))
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        pts = sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: r["fp32_ms"])
        color = STYLE.get(strategy, None)
        marker = "*" if strategy == "unpruned" else "o"
        ax.plot([r["fp32_ms"] for r in pts], [r["fp32_top1"] for r in pts], marker=marker, color=color,
                label=f"{strategy} FP32")
        pts = sorted(pts, key=lambda r: r["int8_ms"])
        ax.plot([r["int8_ms"] for r in pts], [r["int8_top1"] for r in pts], marker=marker, color=color,
                linestyle="--", label=f"{strategy} INT8")
        for r in pts:
            ax.annotate(f"{r['keep_macs']:g}", (r["fp32_ms"], r["fp32_top1"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("latency (ms, ONNX Runtime, measured)")
    ax.set_ylabel("top-1 (%) of the exported ONNX")
    ax.set_title("Accuracy vs latency: pruning after re-parameterization vs before")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def log_tensorboard(writer, rows: list[dict], fig) -> None:
    writer.add_figure("study/pareto", fig, 0)
    layout = {"study": {}}
    for precision in ("fp32", "int8"):
        for r in rows:
            # custom-scalars charts plot value against step: the step is the latency in microseconds
            step = int(round(r[f"{precision}_ms"] * 1000))
            writer.add_scalar(f"study/{r['strategy']}/{precision}_top1", r[f"{precision}_top1"], step)
        layout["study"][f"{precision.upper()} top-1 vs latency (us)"] = ["Multiline", [rf"study/.*/{precision}_top1"]]
    writer.add_custom_scalars(layout)
    writer.flush()


def study_markdown(recipe: Recipe, result: dict) -> str:
    d, s = recipe.data, result["settings"]
    m = result["machine"]
    lines = [
        f"# Study: {recipe.name}",
        "",
        f"Data: {d.kind} {d.root or ''} at {d.image_size}x{d.image_size}, train subset {d.train_subset or 'all'}, "
        f"test subset {d.test_subset or 'all'}. Epochs: train {recipe.train.epochs}, fine-tune "
        f"{recipe.finetune.epochs}, QAT {recipe.quantize.epochs}; scratch trains {recipe.train.epochs + recipe.finetune.epochs}.",
        f"Latency: ONNX Runtime CPU, batch {s['batch']}, {s['rounds']} alternating rounds of {s['iters']} timed batches "
        f"after {s['warmup']} warm-up; {m.get('cpu')}, threads {m.get('threads') or 'all'}, onnxruntime {m.get('onnxruntime')}.",
        "Top-1: of the exported ONNX files, on the test set.",
        "",
        f"Coupling (Torch-Pruning DependencyGraph): {result['coupling']['groups_training_time']} prunable groups in the "
        f"training-time model vs {result['coupling']['groups_plain']} in the plain model.",
        "",
    ]
    header = "| keep_macs | MACs (M) | params (M) | FP32 ms | INT8 ms | FP32 top-1 | INT8 top-1 | widths |"
    for strategy in dict.fromkeys(r["strategy"] for r in result["rows"]):
        lines += [f"## {strategy}", "", header, "|---|---|---|---|---|---|---|---|"]
        for r in (r for r in result["rows"] if r["strategy"] == strategy):
            widths = f"per stage {r['stage_widths']}" if "stage_widths" in r else str(r["widths"])
            lines.append(
                f"| {r['keep_macs']:g} | {r['macs_M']:.2f} | {r['params_M']:.3f} | {r['fp32_ms']:.3f} | "
                f"{r['int8_ms']:.3f} | {r['fp32_top1']:.2f} | {r['int8_top1']:.2f} | {widths} |"
            )
        lines.append("")
    return "\n".join(lines)
