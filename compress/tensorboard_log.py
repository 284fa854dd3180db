"""What a run writes to TensorBoard, under one set of rules:

- A latency tag names its runtime (`runtime_tag`: `ort_cpu`, `ort_cuda`, `ort_tensorrt`, `openvino_cpu`,
  `torch_cpu`, `torch_cuda`) and ends in `_b<batch>`, so no tag ever holds two units or two batch sizes.
- Every scalar carries a description (what it is, its unit, how it was measured), shown on its card.
- Accuracy against latency is drawn by TensorBoard itself: an HParams entry per (exported file, runtime, batch),
  every entry with the same hparam names (`HPARAMS`), and per (runtime, batch, precision) a card of top-1 whose
  step is the latency in microseconds (`accuracy_vs_latency/<runtime>_b<batch>_<precision>`). Each file's point
  lies in its HParams entry's run, alone: TensorBoard's Time Series draws a one-point series as a dot and names it
  by its run, whereas it draws a longer series as a bare line, with no marker at its points.

A latency here is the product's statistic: a file's fastest single timed call over all rounds (docs/timing.md,
`compress.timing`); other work on the machine only ever adds time."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.scalar.metadata import create_summary_metadata

LATENCY_STATISTIC = "fastest single timed call over all bench rounds (docs/timing.md, compress/timing.py)"

# ONNX Runtime's providers and OpenVINO by their `compress.runtime.RUNTIMES` name; PyTorch eager by its device
RUNTIME_TAGS = {"cpu": "ort_cpu", "cuda": "ort_cuda", "tensorrt": "ort_tensorrt", "openvino": "openvino_cpu"}

# Every HParams entry has these hparams, in every run (a study's too): TensorBoard hides the columns of keys that
# differ between entries. A value an entry has no use for is the placeholder of its type.
HPARAMS: dict[str, type] = {"artifact": str, "precision": str, "runtime": str, "batch": int, "macs_M": float,
                            "file_MB": float, "strategy": str, "keep": float, "seed": int}
PLACEHOLDER = {str: "-", int: -1, float: -1.0}
TOP1_METRIC, LATENCY_METRIC = "hparam/top1", "hparam/latency_ms"


def runtime_tag(provider: str, torch_device: str = "cpu") -> str:
    """The runtime's name in tags: `ort_cpu`, `openvino_cpu`, `torch_cuda`... (`provider`: a RUNTIMES name;
    PyTorch eager is named for `torch_device`, where it ran)."""
    if provider == "torch":
        return f"torch_{str(torch_device).split(':')[0]}"
    return RUNTIME_TAGS.get(provider, provider)


def latency_tag(prefix: str, runtime: str, batch: int) -> str:
    """`<prefix>_<runtime>_b<batch>`: a latency tag names its runtime and batch."""
    return f"{prefix}_{runtime}_b{batch}"


def add_scalar(writer, tag: str, value: float, step: int, description: str) -> None:
    """One scalar with its description (what, unit, how measured), which TensorBoard shows on the tag's card."""
    metadata = create_summary_metadata(display_name=tag, description=description)
    summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(value), metadata=metadata)])
    # torch's SummaryWriter.add_scalar takes no description: the summary goes through the writer's own file writer
    writer._get_file_writer().add_summary(summary, int(step))


def hparams(**values) -> dict:
    """An HParams entry's hparams: every name of `HPARAMS`, the ones not given as their type's placeholder."""
    unknown = set(values) - set(HPARAMS)
    if unknown:
        raise ValueError(f"hparams: unknown name(s) {sorted(unknown)}; names: {', '.join(HPARAMS)}")
    return {name: PLACEHOLDER[kind] if values.get(name) is None else kind(values[name])
            for name, kind in HPARAMS.items()}


def series_tag(runtime: str, batch: int, precision: str) -> str:
    """The accuracy-versus-latency series of one runtime, batch and precision."""
    return f"accuracy_vs_latency/{runtime}_b{batch}_{precision}"


def log_accuracy_latency(writer, entries: Iterable[dict], run_prefix: str | None = "hparams",
                         series: bool = True) -> None:
    """Top-1 against latency, as views TensorBoard draws: `entries` are dicts with `hparams` (from `hparams`), `top1`
    (percent), `latency_ms` (the fastest call) and `name` (the entry's HParams run, under `run_prefix/`).

    Each entry becomes an HParams entry in its own run, and with `series` that run also holds the entry's point of
    its (runtime, batch, precision) card, at the latency in microseconds as the step: one dot per file, named by
    its run. Where `run_prefix` is None there are no entry runs, and `series` writes the entries into `writer`'s
    own run as one curve per card (a study's strategy), in order of latency (TensorBoard drops points logged at a
    lower step than the tag's last one)."""
    entries = list(entries)
    if run_prefix is None:
        if series:
            by_tag: dict[str, list[dict]] = {}
            for e in entries:
                by_tag.setdefault(_series_tag(e), []).append(e)
            for tag, members in by_tag.items():
                for e in sorted(members, key=lambda e: e["latency_ms"]):
                    _add_point(writer, tag, e, "one point per file, joined in order of latency")
        writer.flush()
        return
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    for e in entries:
        metrics = {TOP1_METRIC: float(e["top1"]), LATENCY_METRIC: float(e["latency_ms"])}
        # what `SummaryWriter.add_hparams` writes, and the entry's point beside it in the same run and event file
        run = Path(writer.log_dir) / run_prefix / e["name"]
        for old in run.glob("events.out.tfevents.*"):  # the run is this entry's alone: a re-bench replaces it
            old.unlink()
        with SummaryWriter(str(run)) as entry_writer:
            for summary in hparams_summaries(e["hparams"], metrics):
                entry_writer._get_file_writer().add_summary(summary)
            for tag, value in metrics.items():
                entry_writer.add_scalar(tag, value)
            if series:
                _add_point(entry_writer, _series_tag(e), e, "one dot per file, named by its run")
    writer.flush()


def _series_tag(entry: dict) -> str:
    hp = entry["hparams"]
    return series_tag(hp["runtime"], hp["batch"], hp["precision"])


def _add_point(writer, tag: str, entry: dict, layout: str) -> None:
    """An entry's top-1 on its accuracy-versus-latency card, at step = its latency in microseconds."""
    hp = entry["hparams"]
    description = (f"top-1 (%) of the {hp['precision'].upper()} files, {layout}, at step = its latency in "
                   f"microseconds on {hp['runtime']}, batch {hp['batch']} (the {LATENCY_STATISTIC})")
    add_scalar(writer, tag, entry["top1"], round(entry["latency_ms"] * 1000), description)


def custom_layout(latency_target: bool = False, accuracy_latency: bool = False) -> dict:
    """The Custom Scalars dashboard: the latency target's rounds on one chart, and top-1 against latency (us) per
    precision. A run has one layout (the last written wins), so every stage writes all the charts the run has."""
    layout = {}
    if latency_target:
        layout["prune: latency target (ms) per re-plan round"] = {
            "budget, predicted, measured": ["Multiline", [r"prune/latency_target/.*"]]}
    if accuracy_latency:
        layout["top-1 (%) against latency (step: microseconds)"] = {
            f"{p.upper()} files": ["Multiline", [rf"accuracy_vs_latency/.*_{p}$"]] for p in ("fp32", "int8")}
    return layout


def log_prune(writer, report: dict, top1: float, runtime: str | None = None, batch: int | None = None) -> None:
    """The prune stage: the widths before and after, the top-1 right after pruning (before any fine-tuning), and a
    latency target's budget, prediction and measurement of every re-plan round on one Custom Scalars chart
    (`runtime`, `batch`: where the target is timed)."""
    from .figures import widths_figure

    writer.add_figure("prune/widths", widths_figure(report["widths_before"], report["widths_after"]), 0)
    add_scalar(writer, "prune/top1_before_finetune", top1, 0,
               "top-1 (%) on the test set right after pruning (and any re-fit), before fine-tuning, in PyTorch")
    latency = report.get("latency")
    if not latency or runtime is None or batch is None:
        return
    how = f"on {runtime}, batch {batch}"
    rounds = latency.get("rounds") or [{"budget_ms": latency["budget_ms"], "predicted_ms": latency["predicted_ms"]}]
    for step, r in enumerate(rounds, 1):
        add_scalar(writer, latency_tag("prune/latency_target/budget_ms", runtime, batch), r["budget_ms"], step,
                   f"the latency budget (ms, latency-table scale) the plan of this re-plan round was made within, {how}")
        if r.get("predicted_ms") is not None:
            add_scalar(writer, latency_tag("prune/latency_target/predicted_ms", runtime, batch), r["predicted_ms"],
                       step, f"the latency table's prediction (ms) of this round's plan, {how}")
        if "measured_ratio" in r:
            add_scalar(writer, latency_tag("prune/latency_target/measured_ms", runtime, batch),
                       r["measured_ratio"] * r["unpruned_ms"], step,
                       f"this round's plan, measured (ms): its median same-round ratio to the unpruned model times "
                       f"the unpruned model's fastest call, {how}")
            add_scalar(writer, latency_tag("prune/latency_target/target_ms", runtime, batch),
                       r["target_ratio"] * r["unpruned_ms"], step,
                       f"the target (ms): the target ratio times the unpruned model's fastest call, {how}")
    writer.add_custom_scalars(custom_layout(latency_target=True))


def bench_entries(results: list[dict], artifacts: dict, torch_device: str = "cpu") -> list[dict]:
    """An accuracy-latency entry (`log_accuracy_latency`) per timed (exported file, runtime, batch)."""
    entries = []
    for r in results:
        a = artifacts.get(r["artifact"])
        if a is None or a.get("top1") is None or r.get("fastest_ms") is None:
            continue
        runtime = runtime_tag(r["provider"], torch_device)
        macs = a.get("macs")
        hp = hparams(artifact=r["artifact"], precision=r["artifact"].rsplit("_", 1)[-1], runtime=runtime,
                     batch=r["batch"], macs_M=macs and macs / 1e6, file_MB=a.get("size_bytes", 0) / 1e6 or None)
        entries.append({"name": f"{r['artifact']}_{runtime}_b{r['batch']}", "hparams": hp, "top1": a["top1"],
                        "latency_ms": r["fastest_ms"]})
    return entries


def log_bench(writer, results: list[dict], artifacts: dict, figure, torch_device: str = "cpu",
              latency_target: bool = False) -> None:
    """The bench stage: the accuracy-latency figure, every (file, runtime, batch) latency under its own tag, and
    top-1 against latency as HParams entries and series (`log_accuracy_latency`)."""
    writer.add_figure("bench/accuracy_latency", figure, 0)
    for r in results:
        if r.get("fastest_ms") is None:
            continue
        runtime = runtime_tag(r["provider"], torch_device)
        add_scalar(writer, latency_tag(f"bench/latency_ms/{r['artifact']}", runtime, r["batch"]), r["fastest_ms"], 0,
                   f"latency (ms) of {r['artifact']} on {runtime}, batch {r['batch']}: the {LATENCY_STATISTIC}")
    log_accuracy_latency(writer, bench_entries(results, artifacts, torch_device))
    writer.add_custom_scalars(custom_layout(latency_target=latency_target, accuracy_latency=True))
    writer.flush()


def log_latency_check(writer, check: dict, torch_device: str = "cpu") -> None:
    """The bench's measurement of the file a latency target pruned, on the target's runtime and batch, beside the
    prune stage's rounds (`log_prune`)."""
    if check.get("measured_ms") is None:
        return
    runtime = runtime_tag(check["provider"], torch_device)
    add_scalar(writer, latency_tag("prune/latency_target/bench_measured_ms", runtime, check["batch"]),
               check["measured_ms"], 0, f"latency (ms) of {check['artifact']} as the bench stage measured it on "
               f"{runtime}, batch {check['batch']}: the {LATENCY_STATISTIC}")


def text_number(value) -> str:
    """A number as the result table rounds it: two decimals; a small non-zero float (a logit difference) with
    three significant digits, so it does not print as 0.00."""
    if isinstance(value, float):
        return f"{value:.3g}" if value and abs(value) < 0.01 else f"{value:.2f}"
    return str(value)


def split_tables(markdown: str, max_columns: int = 7, max_header_chars: int = 100) -> str:
    """`markdown` with every table wider than `max_columns`, or whose headers past the first hold more than
    `max_header_chars` characters, cut into tables within both limits, each repeating the first column (the row's
    name): TensorBoard's text dashboard squeezes a wide table's columns until its headers and names break
    mid-word."""
    lines, out, i = markdown.splitlines(), [], 0
    while i < len(lines):
        if not lines[i].startswith("|"):
            out.append(lines[i])
            i += 1
            continue
        table = []
        while i < len(lines) and lines[i].startswith("|"):
            table.append([cell.strip() for cell in lines[i].strip().strip("|").split("|")])
            i += 1
        width, header = len(table[0]), [len(cell) for cell in table[0]]
        parts = -(-(width - 1) // (max_columns - 1))
        while True:
            size, longer = divmod(width - 1, parts)  # parts as even as can be
            bounds, begin = [], 1
            for part in range(parts):
                bounds.append((begin, begin + size + (part < longer)))
                begin = bounds[-1][1]
            if parts >= width - 1 or all(sum(header[b:e]) <= max_header_chars for b, e in bounds):
                break
            parts += 1
        for begin, end in bounds:
            columns = [0, *range(begin, end)]
            out += ["| " + " | ".join(row[c] if c < len(row) else "" for c in columns) + " |" for row in table]
            out.append("")
        if out[-1] == "":
            out.pop()
    return "\n".join(out)


def add_text(writer, tag: str, markdown: str) -> None:
    """Markdown for TensorBoard's text dashboard, its wide tables split (`split_tables`)."""
    writer.add_text(tag, split_tables(markdown), 0)
