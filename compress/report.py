"""The end-of-run report a person reads: one row per exported file (top-1, MACs, params, size, latency per runtime
at the main batch as its fastest call, speed-up over the unpruned plain FP32 model), the top-1 of every stage, the
pruned widths, and where the TensorBoard run and the ONNX files are. Printed and written to DIR/report.md."""

from __future__ import annotations

from pathlib import Path

from .files import write_text
from .recipe import Recipe
from .runtime import RUNTIMES, describe_cpu

REFERENCE = "plain_fp32"
# a top-1 below these says little: measured on fewer test images, or this close to guessing (points)
MIN_IMAGES = 1000
CHANCE_MARGIN_PT = 2.0


def _label(runtime: str) -> str:
    """The runtime's column name (e.g. "ORT CPU"); a name no runtime has (an older summary's) as it is."""
    return RUNTIMES[runtime].label if runtime in RUNTIMES else runtime


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def fastest_ms(result: dict) -> float | None:
    """A bench result's latency: its fastest call (`compress.timing`), from its rounds' fastest calls where the
    result has no `fastest_ms`; None (shown as "-") where it has neither."""
    if "fastest_ms" in result:
        return result["fastest_ms"]
    return min(result["round_fastest_ms"]) if result.get("round_fastest_ms") else None


def _latencies(bench: dict) -> tuple[list[str], dict, dict]:
    """Providers in bench order, {(artifact, provider): fastest call, ms} and {(artifact, provider): speed-up over
    the reference} at the main batch (speed-up: the median of same-round ratios, as bench computes them)."""
    batch = bench["main_batch"]
    results = [r for r in bench["results"] if r["batch"] == batch]
    providers = list(dict.fromkeys(r["provider"] for r in results))
    latency = {(r["artifact"], r["provider"]): fastest_ms(r) for r in results}
    speedup = {}
    for d in bench.get("ratio_details", []):
        name, ref = d["ratio"].split("/")
        if d["batch"] == batch and ref == REFERENCE:
            speedup[(name, d["provider"])] = 1.0 / d["median"]
    for provider in providers:
        if (REFERENCE, provider) in latency:
            speedup[(REFERENCE, provider)] = 1.0
    return providers, latency, speedup


def accuracy_caveats(artifacts: dict, num_classes: int | None) -> list[str]:
    """Why the files' top-1 is not a result, one line per reason: measured on fewer than `MIN_IMAGES` test images,
    or within `CHANCE_MARGIN_PT` of chance (100 / classes). The figure and the result table print the same lines."""
    few = [name for name, a in artifacts.items() if a.get("n") is not None and a["n"] < MIN_IMAGES]
    lines = []
    if few:
        counts = sorted({artifacts[name]["n"] for name in few})
        lines.append(f"top-1 of {', '.join(few)} comes from {', '.join(map(str, counts))} test images "
                     f"(fewer than {MIN_IMAGES:,}): not a result")
    if num_classes:
        chance = 100.0 / num_classes
        near = [name for name, a in artifacts.items()
                if a.get("top1") is not None and a["top1"] <= chance + CHANCE_MARGIN_PT]
        if near:
            lines.append(f"top-1 of {', '.join(near)} is within {CHANCE_MARGIN_PT:g} pt of chance "
                         f"({chance:.1f}% for {num_classes} classes): the model has not learned the task")
    return lines


def artifact_table(artifacts: dict, bench: dict | None) -> list[str]:
    """Markdown rows: one per exported file."""
    providers, latency, speedup = _latencies(bench) if bench else ([], {}, {})
    batch = bench["main_batch"] if bench else None
    header = ["artifact", "top-1 %", "images", "MACs (M)", "params (M)", "file MB"]
    for p in providers:
        header += [f"{_label(p)} fastest call ms @{batch}", f"x vs {REFERENCE} ({_label(p)})"]
    if len(providers) > 1:
        header.append("fastest runtime")  # the runtime to deploy this file on, by its fastest call here
    stems = (bench or {}).get("stem_share") or {}
    if stems:
        header.append("stem share (ORT CPU profile)")
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, a in artifacts.items():
        macs, params = a.get("macs"), a.get("params")
        cells = [name, _fmt(a.get("top1"), ".2f"), str(a.get("n", "-")), _fmt(macs and macs / 1e6, ".1f"),
                 _fmt(params and params / 1e6, ".2f"), f"{a['size_bytes'] / 1e6:.1f}"]
        for p in providers:
            cells += [_fmt(latency.get((name, p)), ".2f"), _fmt(speedup.get((name, p)), ".2f")]
        if len(providers) > 1:
            timed = [p for p in providers if latency.get((name, p)) is not None]
            cells.append(_label(min(timed, key=lambda p: latency[(name, p)])) if timed else "-")
        if stems:
            cells.append(f"{100 * stems[name]:.1f}%" if name in stems else "-")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def stage_table(stages: dict) -> list[str]:
    """Markdown rows: the top-1 each stage measured, in PyTorch."""
    rows = ["| stage | top-1 % | top-5 % |", "|---|---|---|"]
    for stage, entry in stages.items():
        if "top1" in entry:
            rows.append(f"| {stage} | {entry['top1']:.2f} | {_fmt(entry.get('top5'), '.2f')} |")
    return rows


def training_table(history: list[dict]) -> list[str]:
    """Markdown rows: a training's test top-1 after each epoch, its training loss, learning rate and seconds (the
    training alone, and with the evaluation after it), then the totals."""
    rows = ["| epoch | top-1 % | top-5 % | train loss | lr (last step) | training s | with evaluation s |",
            "|---|---|---|---|---|---|---|"]
    for h in history:
        rows.append(f"| {h['epoch']} | {h['top1']:.2f} | {h['top5']:.2f} | {h['train_loss']:.4f} | {h['lr']:.3g} | "
                    f"{h['train_seconds']:.0f} | {_fmt(h.get('wall_seconds'), '.0f')} |")
    walls = [h["wall_seconds"] for h in history if "wall_seconds" in h]
    wall = f", {sum(walls) / 60:.1f} min with evaluations" if len(walls) == len(history) else ""
    rows += ["", f"{len(history)} epochs: {sum(h['train_seconds'] for h in history) / 60:.1f} min of training{wall}"]
    return rows


def int8_parity_table(artifacts: dict) -> list[str]:
    """Markdown rows: each INT8 file against its fake-quant model in PyTorch, on the same test images, per runtime."""
    rows = ["| artifact | runtime | images | fake-quant top-1 % (PyTorch) | top-1 % (file) | same class % | "
            "max abs logit diff | mean | logit range |", "|---|---|---|---|---|---|---|---|---|"]
    for name, a in artifacts.items():
        for runtime, p in a.get("int8_parity", {}).items():
            rows.append(f"| {name} | {_label(runtime)} | {p['n']} | {_fmt(p.get('torch_top1'), '.2f')} | "
                        f"{_fmt(p.get('onnx_top1'), '.2f')} | {100 * p['agreement']:.1f} | {p['max_abs_diff']:.3g} | "
                        f"{p['mean_abs_diff']:.3g} | {p['logit_range']:.3g} |")
    return rows if len(rows) > 2 else []


def run_report(recipe: Recipe, summary: dict, out_dir: Path) -> str:
    """The report of a finished run, as markdown; also written to `out_dir/report.md`."""
    stages = summary["stages"]
    lines = [f"# {recipe.name}", ""]
    artifacts = stages.get("export", {}).get("artifacts")
    if artifacts:
        bench = stages.get("bench")
        lines += ["Exported files (top-1 measured on the ONNX file with ONNX Runtime"
                  + (f"; latency: fastest call over all rounds at batch {bench['main_batch']}, "
                     f"{describe_cpu(bench['machine'])}"
                     f", threads {bench['machine'].get('threads') or 'all'})" if bench else ")"), "",
                  *artifact_table(artifacts, bench), ""]
        caveats = accuracy_caveats(artifacts, stages["export"].get("num_classes"))
        if caveats:
            lines += [f"Caution: {line}." for line in caveats] + [""]
        parity = int8_parity_table(artifacts)
        if parity:
            lines += ["INT8 parity (each INT8 file and its fake-quant model on the same test images):", "", *parity, ""]
    lines += ["Stages (top-1 in PyTorch on the test set):", "", *stage_table(stages), ""]
    history = (stages.get("train") or {}).get("history") or []
    if len(history) > 1:
        lines += ["Training, epoch by epoch (top-1 in PyTorch on the test set):", "", *training_table(history), ""]
    quantize = stages.get("quantize")
    if quantize and "target_device" in quantize:
        ptq = f"; PTQ top-1 {quantize['ptq_top1']:.2f}% before QAT" if quantize["mode"] == "qat" else ""
        lines += [f"INT8 for {quantize['target_device']} (overflow fix: {quantize['overflow_fix']}){ptq}", ""]
    finetune = stages.get("finetune")
    if finetune and "structure" in finetune:
        folded = (f"; folded back exactly (max abs logit diff {finetune['max_abs_diff']:.2g})"
                  if "max_abs_diff" in finetune else "")
        lines += [f"Fine-tuned as: {finetune['structure']}{folded}", ""]
    check = (stages.get("bench") or {}).get("prune_latency")
    if check:
        measured = _fmt(check["measured_ms"], ".2f") if check["measured_ms"] is not None else "not timed by bench"
        ratio = (f"; {check['artifact']} / {check['artifact'].replace('pruned', 'plain')} "
                 f"{check['measured_ratio']:.3f} measured for {check['target_ratio']:.3f} (median of per-round "
                 "ratios, each round's fastest call)" if "measured_ratio" in check else "")
        rounds = (stages.get("prune") or {}).get("latency", {}).get("rounds") or []
        loop = (f"; the plan was timed {len(rounds)} time(s) against the unpruned model: "
                + ", ".join(f"{r['measured_ratio']:.3f}" for r in rounds) if rounds else "")
        lines += [f"Latency target ({check['artifact']}, {_label(check['provider'])}, batch "
                  f"{check['batch']}): budget {check['budget_ms']:.2f} ms, predicted {check['predicted_ms']:.2f} ms, "
                  f"measured {measured} ms{ratio}{loop}", ""]
    prune = stages.get("prune")
    if prune and "widths_after" in prune:
        lines += [f"Widths, plain -> pruned (MACs kept {prune['keep_macs_achieved']:.3f}):",
                  "    " + " ".join(f"{b}->{a}" if a != b else str(a)
                                  for b, a in zip(prune["widths_before"], prune["widths_after"])), ""]
    lines += [f"TensorBoard: tensorboard --logdir {out_dir / 'tb'}"]
    if artifacts:
        lines += [f"ONNX files: {out_dir / 'onnx'}"]
    text = "\n".join(lines) + "\n"
    write_text(out_dir / "report.md", text)
    return text
