"""The study's report: study.md (conclusions first, then the tables), study.json, pareto.png and TensorBoard
(the figure, top-1 against latency as custom scalars, and an HParams table of the points)."""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from ..figures import finish_panels, new_figure
from ..files import write_json, write_text
from ..recipe import Recipe
from ..runtime import describe_cpu
from ..tensorboard_log import custom_layout, hparams, log_accuracy_latency
from .analysis import ORDER_ROUNDS, PRECISIONS, curve
from .budget import budget_figure, comparisons
from .strategies import STRATEGIES, UNPRUNED_COLOUR


def _batch_keys(obj):
    """`obj` with every all-digit dict key made an int again: JSON writes the batch sizes that key the latencies
    ({batch: ms}) as strings."""
    if isinstance(obj, dict):
        return {int(k) if isinstance(k, str) and k.isdigit() else k: _batch_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_batch_keys(v) for v in obj]
    return obj


def read_result(out_dir: Path) -> dict:
    """The study result `write_report` wrote to DIR/study.json, as it was in memory (`study_markdown` reads it)."""
    return _batch_keys(json.loads((Path(out_dir) / "study.json").read_text()))


def write_report(recipe: Recipe, result: dict, out_dir: Path, writer=None) -> None:
    write_text(out_dir / "study.md", study_markdown(recipe, result))
    write_json(out_dir / "study.json", result)
    curves = [r for r in result["rows"] if r["seed"] == 0]  # further seeds: in the points table only
    fig = pareto_figure(curves, result["settings"]["main_batch"])
    fig.savefig(out_dir / "pareto.png", dpi=120)
    budget = budget_figure(result["budget"]["rows"]) if "budget" in result else None
    if budget is not None:
        budget.savefig(out_dir / "prune_or_retrain.png", dpi=120)
    if writer is not None:
        log_tensorboard(writer, curves, result["settings"]["main_batch"], fig)
        if budget is not None:
            writer.add_figure("study/prune_or_retrain", budget, 0)
            writer.flush()


def pareto_figure(rows: list[dict], batch: int):
    """Top-1 of the exported files against their measured latency at `batch`, FP32 and INT8 side by side, with
    95% Wilson intervals as error bars; every pruning strategy's curve ends at the unpruned model, as compared."""
    fig = new_figure((13, 5))
    axes = fig.subplots(1, 2, sharey=True)
    unpruned = [r for r in rows if r["strategy"] == "unpruned"]
    for ax, precision in zip(axes, PRECISIONS):
        for strategy in dict.fromkeys(r["strategy"] for r in rows):
            pts = sorted(curve(strategy, [r for r in rows if r["strategy"] == strategy], unpruned),
                         key=lambda r: r[f"{precision}_ms"][batch])
            x = [r[f"{precision}_ms"][batch] for r in pts]
            y = [r[f"{precision}_top1"] for r in pts]
            err = [[v - r[f"{precision}_ci"][0] for v, r in zip(y, pts)],
                   [r[f"{precision}_ci"][1] - v for v, r in zip(y, pts)]]
            ax.errorbar(x, y, yerr=err, marker="*" if strategy == "unpruned" else "o", color=UNPRUNED_COLOUR if strategy == "unpruned" else STRATEGIES[strategy].colour,
                        capsize=3, label=strategy, markersize=9 if strategy == "unpruned" else 5)
            for r in (r for r in pts if r["strategy"] == strategy):
                ax.annotate(f"{r['keep']:g}", (r[f"{precision}_ms"][batch], r[f"{precision}_top1"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"latency (ms): fastest call on ONNX Runtime CPU, batch {batch}")
        ax.set_title(f"{precision.upper()}")
        ax.grid(alpha=0.3)
    return finish_panels(fig, axes, "top-1 (%) of the exported ONNX file, 95% interval",
                         "Accuracy vs latency: pruning after re-parameterization vs before, vs training small")


def study_entries(rows: list[dict]) -> list[dict]:
    """An accuracy-latency entry (`compress.tensorboard_log.log_accuracy_latency`) per point, precision and timed
    batch: its exported file on ONNX Runtime CPU, with the hparam names every run uses."""
    entries = []
    for r in rows:
        for precision in PRECISIONS:
            size = r.get(f"{precision}_size_bytes")
            for batch, ms in r[f"{precision}_ms"].items():
                hp = hparams(artifact=r.get(f"{precision}_file"), precision=precision, runtime="ort_cpu", batch=batch,
                             macs_M=r["macs_M"], file_MB=size and size / 1e6, strategy=r["strategy"], keep=r["keep"],
                             seed=r["seed"])
                entries.append({"name": f"{r['strategy']}_{r['keep']:g}_seed{r['seed']}_{precision}_ort_cpu_b{batch}",
                                "hparams": hp, "top1": r[f"{precision}_top1"], "latency_ms": ms})
    return entries


def log_tensorboard(writer, rows: list[dict], batch: int, fig) -> None:
    """The study in TensorBoard: the figure; every point as HParams entries (one per file, runtime and batch); and
    each strategy's curve as the series `accuracy_vs_latency/ort_cpu_b<batch>_<precision>` (step: latency in
    microseconds) of its own run, `curves/<strategy>`, so that TensorBoard overlays the strategies on one card."""
    writer.add_figure("study/pareto", fig, 0)
    log_accuracy_latency(writer, study_entries(rows), series=False)
    unpruned = [r for r in rows if r["strategy"] == "unpruned"]
    strategies = [s for s in dict.fromkeys(r["strategy"] for r in rows) if s != "unpruned"] or ["unpruned"]
    for strategy in strategies:
        members = curve(strategy, [r for r in rows if r["strategy"] == strategy], unpruned)
        with SummaryWriter(str(Path(writer.log_dir) / "curves" / strategy)) as curve_writer:
            log_accuracy_latency(curve_writer, study_entries(members), run_prefix=None)
    writer.add_custom_scalars(custom_layout(accuracy_latency=True))
    writer.flush()


def _pt(v: float) -> str:
    return f"{v:+.2f}"


def _per_seed(c: dict) -> str:
    """A comparison's difference on each seed's own curves, '+1.92 / +1.17' ('-': that seed's curves do not both
    reach the latency)."""
    return " / ".join("-" if d is None else _pt(d) for d in c["seed_diffs"])


def _comparison_line(c: dict) -> str:
    seeds = c["seed_diffs"]
    return (f"{c['a']} vs {c['b']}, {c['precision'].upper()} at {c['latency_ms']:.3f} ms (batch {c['batch']}): "
            f"{c['top1_a']:.2f} vs {c['top1_b']:.2f}% top-1, {_pt(c['diff'])} pt [{c['low']:+.2f}, {c['high']:+.2f}]"
            + (f"; seeds +0 to +{len(seeds) - 1} on their own curves: {_per_seed(c)} pt" if len(seeds) > 1 else ""))


def conclusions(result: dict) -> list[str]:
    """The significant differences at the main batch, then a line on what is not."""
    batch = result["settings"]["main_batch"]
    main = [c for c in result["comparisons"] if c["batch"] == batch]
    lines = ["## Conclusions", ""]
    significant = [c for c in main if c["significant"]]
    family = f"Holm-corrected over all {len(result['comparisons'])} comparisons of this report"
    if significant:
        lines.append(f"Significant differences at equal measured latency (batch {batch}; 95% paired bootstrap over "
                     f"test images, {family}; + means the first is more accurate):")
        lines += [f"- {_comparison_line(c)}" for c in significant]
    else:
        lines.append(f"No difference at equal measured latency (batch {batch}) is significant at 95% ({family}).")
    counts = {}
    for c in main:
        n = counts.setdefault((c["b"], c["precision"].upper()), [0, 0])
        n[0] += c["significant"]
        n[1] += 1
    if counts:
        lines.append("- Significant of compared latencies: " + "; ".join(
            f"plain vs {b} {p}: {k} of {n}" for (b, p), (k, n) in counts.items()) + ".")
    missing = sorted({r["strategy"] for r in result["rows"]} - {c["b"] for c in main} - {"unpruned", "plain"})
    if missing:
        lines.append(f"- No shared latency range with plain (no extrapolation): {', '.join(missing)}.")
    lines += _left_out(result, batch)
    seeds = len({r["seed"] for r in result["rows"]})
    if seeds > 1:
        lines += ["", f"These intervals cover the sampling of test images only: significance is called on seed +0's "
                  f"curves. Beside each, its difference on each of the {seeds} seeds' own curves (the fine-tunes and "
                  "QAT, or scratch trainings, of that seed on the one base; the points table lists them) shows the "
                  "spread between trainings.", ""]
    else:
        lines += ["", "These intervals cover the sampling of test images only, not training seeds: every compared "
                  "point is one trained model.", ""]
    return lines


def _spread(rows: list[dict], batch: int) -> str:
    """The benchmark's round-to-round spread at `batch`: how far a file's round timings (each round's fastest call)
    lie apart (max - min)."""
    spreads = [max(ms) - min(ms) for row in rows for p in PRECISIONS
               for b, ms in row.get(f"{p}_rounds_ms", {}).items() if b == batch]
    if not spreads:
        return ""
    return (f"Round-to-round spread of a file's fastest call at batch {batch}: {min(spreads):.3f} to "
            f"{max(spreads):.3f} ms (a latency is compared only where each curve's two points keep their order in "
            f"every round that timed both undisturbed, and there are {ORDER_ROUNDS} or more such rounds, or, with "
            f"fewer, where each point's own undisturbed rounds, {ORDER_ROUNDS} or more, lie apart from the other's).")


def _left_out(result: dict, batch: int) -> list[str]:
    """What the comparisons did not use, at the main batch: points under their curve's upper hull (slower than a
    mix of two others that is at least as accurate), and latencies where a curve's two neighbouring points swap
    order between bench rounds."""
    lines = []
    for o in (o for o in result.get("off_hull", []) if o["batch"] == batch):
        lines.append(f"- Off the upper hull, not compared: {o['strategy']} at keep {o['keep']:g} in "
                     f"{o['precision'].upper()} (a mix of two other points of its curve is as fast and more accurate).")
    for k in (k for k in result.get("skipped", []) if k["batch"] == batch):
        lines.append(f"- Not compared: {k['a']} vs {k['b']} {k['precision'].upper()} at {k['latency_ms']:.3f} ms: "
                     f"{k['why']}.")
    return lines


def budget_section(budget: dict, batch: int) -> list[str]:
    """The prune-or-retrain curve: the verdicts, how the scratch widths were matched, every point."""
    match = budget["match"]
    tries = ", ".join(f"{t['measured_ratio']:.3f}" for t in match["tries"])
    resrep = [f"- {p.upper()}: {v}" for p, v in (budget.get("resrep") or {}).items() if v]
    lines = ["", "## Prune or retrain", "", f"- FP32: {budget['verdict']}", f"- INT8: {budget['verdict_int8']}",
             *resrep,
             f"- Latency: the pruned side keeps {budget['keep_latency']:g} of the unpruned FP32 latency (batch 8); its "
             f"model measured {match['pruned_ratio']:.3f} of the unpruned one; the scratch widths measured {tries} "
             f"(searched on the latency table, {match['provider']}, within 5%, else the closest): "
             f"{match['widths']}.",
             "- Added images: the pruned side's fine-tune; the scratch side's whole training; the ResRep side's "
             "compactor training. "
             + ("Equal total images: scratch trained on the base's images plus the recipe's fine-tune."
                if budget["equal_total"] else "Equal total images: not run (`study.budget_equal_total: "
                "false`)."),
             *(f"- {line}" for p in PRECISIONS for line in comparisons(budget["rows"], p)), "",
             f"| side | added images | seed | images seen | FP32 top-1 [95%] | INT8 top-1 [95%] | FP32 ms @{batch} |",
             "|---|---|---|---|---|---|---|"]
    for r in budget["rows"]:
        added = "equal total" if r["added_images"] is None else f"{r['added_images']:,}"
        lines.append(f"| {r['side']} | {added} | +{r['seed']} | {_images(r['images_seen'])} | "
                     + " | ".join(f"{r[f'{p}_top1']:.2f} [{r[f'{p}_ci'][0]:.1f}, {r[f'{p}_ci'][1]:.1f}]"
                                  for p in PRECISIONS) + f" | {r['fp32_ms'][batch]:.3f} |")
    return lines


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' * (n != 1)}"


def _images(n: int) -> str:
    return f"{n / 1000:.0f}k"


def _widths_cell(stage: list[int]) -> str:
    return str(stage[0]) if len(set(stage)) == 1 else f"{min(stage)}-{max(stage)}"


def study_markdown(recipe: Recipe, result: dict) -> str:
    d, s, m = recipe.data, result["settings"], result["machine"]
    ft, q = recipe.finetune, recipe.quantize
    batch, batches = s["main_batch"], s["batches"]
    repeated = any(r["seed"] for r in result["rows"])  # further seeds: a per-seed column beside each comparison
    lines = [f"# Study: {recipe.name}", ""]
    if "budget" in result:
        lines += [result["budget"]["verdict"], ""]
    lines += [f"Base: the trained multi-branch model has {result['base']['top1']:.2f}% top-1 on the test set "
              f"(PyTorch; {result['base']['dir']}).", ""]
    lines += conclusions(result)
    lines += [
        "## Setup", "",
        f"- Data: {d.kind} {d.root or ''} at {d.image_size}x{d.image_size}; base trained on "
        f"{d.train_subset or 'all'} training images for {_epochs(recipe.train.epochs)}; test set: "
        f"{d.test_subset or 'all'} images.",
        f"- Every pruned point: fine-tuned {_epochs(ft.epochs)} on {ft.train_subset or 'all'} training images"
        f"{' with distillation from the unpruned plain model' if ft.distill else ''}, then INT8 "
        f"{q.mode.upper()} ({_epochs(q.epochs)} on {q.train_subset or 'all'} images). Scratch points train from random "
        f"init on as many images as base plus fine-tune"
        f"{', distilled from the same teacher' if recipe.study.scratch_distill else ''}, then the same QAT.",
        "- Top-1: of the exported ONNX files, on the test set, with 95% Wilson intervals; PTQ and QAT top-1: the "
        "INT8 model in PyTorch (fake-quant) after calibration alone and after QAT; pruned top-1: the model right "
        "after pruning, before any fine-tuning (the allocation's quality). Seed: the offset from the "
        "recipe's seed of the point's fine-tune and QAT (a scratch point's training); curves and comparisons use "
        "seed +0.",
        f"- Latency: ONNX Runtime CPU, batches {', '.join(map(str, batches))}, {s['rounds']} alternating rounds of "
        f"{s['iters']} timed batches after {s['warmup']} warm-up; {describe_cpu(m)}, threads {m.get('threads') or 'all'}, "
        f"onnxruntime {m.get('onnxruntime')}. A file's latency is its fastest call over all rounds (other "
        f"work on the machine only adds time). {_spread(result['rows'], batch)}",
        "",
        "## Points", "",
        "| strategy | keep | seed | MACs (M) | params (M) | images seen | pruned top-1 (PyTorch) | FP32 top-1 [95%] | "
        "INT8 top-1 [95%] | INT8 - FP32 (pt) | PTQ top-1 (PyTorch) | QAT top-1 (PyTorch) | "
        + " | ".join(f"{p.upper()} ms @{b}" for b in batches for p in PRECISIONS) + " |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * (2 * len(batches)),
    ]
    for r in result["rows"]:
        cells = [r["strategy"], f"{r['keep']:g}", f"+{r['seed']}", f"{r['macs_M']:.2f}", f"{r['params_M']:.3f}",
                 _images(r["images_seen"]), "-" if r.get("pruned_top1") is None else f"{r['pruned_top1']:.2f}"]
        cells += [f"{r[f'{p}_top1']:.2f} [{r[f'{p}_ci'][0]:.1f}, {r[f'{p}_ci'][1]:.1f}]" for p in PRECISIONS]
        cells.append(_pt(r["int8_top1"] - r["fp32_top1"]))
        cells += ["-" if r.get(k) is None else f"{r[k]:.2f}" for k in ("ptq_top1", "qat_top1")]
        cells += [f"{r[f'{p}_ms'][b]:.3f}" for b in batches for p in PRECISIONS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Comparisons at equal measured latency", "",
              "Each side's per-image correctness interpolated linearly between the two points of its curve's upper "
              "hull around that latency (a latency between two models is reached by routing that share of the "
              "inputs to each); 95% paired bootstrap over test images (the same resample for both sides); "
              "significance Holm-corrected over every comparison in this table.", "",
              "| compared | precision | batch | latency ms | top-1 a | top-1 b | a - b (pt) | 95% interval "
              "| p | significant (Holm) |" + (" a - b per seed (pt) |" if repeated else ""),
              "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if repeated else "")]
    order = sorted(result["comparisons"], key=lambda c: (c["b"], c["batch"] != batch, c["precision"], c["latency_ms"]))
    for c in order:
        lines.append(f"| {c['a']} vs {c['b']} | {c['precision'].upper()} | {c['batch']} | {c['latency_ms']:.3f} | "
                     f"{c['top1_a']:.2f} | {c['top1_b']:.2f} | {_pt(c['diff'])} | "
                     f"[{c['low']:+.2f}, {c['high']:+.2f}] | {c['p']:.3g} | {'yes' if c['significant'] else 'no'} |"
                     + (f" {_per_seed(c)} |" if repeated else ""))
    if "budget" in result:
        lines += budget_section(result["budget"], batch)
    coupling = result["coupling"]
    lines += ["", "## Coupling", "",
              f"Torch-Pruning's DependencyGraph finds {coupling['groups_training_time']} prunable groups in the "
              f"training-time model and {coupling['groups_plain']} in the plain model: the identity branches tie "
              f"every layer of a stage to the same channels.", "",
              "Widths per stage (a range where the layers of a stage differ):", "",
              "| strategy | keep | stem | stage 1 | stage 2 | stage 3 | stage 4 |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["seed"] == 0:  # a point's widths do not depend on its seed
            lines.append(f"| {r['strategy']} | {r['keep']:g} | " + " | ".join(map(_widths_cell, r["stage_widths"]))
                         + " |")
    targets = [r for r in result["rows"] if "latency_target" in r]
    if targets:
        lines += ["", "## Latency targets", "", "| keep_latency | unpruned ms (table) | budget ms | predicted ms | "
                  f"measured FP32 ms @{batch} |", "|---|---|---|---|---|"]
        for r in (r for r in targets if r["seed"] == 0):
            t = r["latency_target"]
            lines.append(f"| {r['keep']:g} | {t['before_ms']:.3f} | {t['budget_ms']:.3f} | {t['predicted_ms']:.3f} | "
                         f"{r['fp32_ms'][batch]:.3f} |")
    if result["timings"]:
        lines += ["", "## Wall time per phase (when it last ran)", "", "| phase | wall time |", "|---|---|"]
        lines += [f"| {phase} | {_duration(sec)} |" for phase, sec in result["timings"].items()]
        lines.append(f"| all of the above | {_duration(sum(result['timings'].values()))} |")
    lines.append("")
    return "\n".join(lines)
