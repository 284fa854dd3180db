"""Stage `bench`: the latency of every exported file on every runtime asked for (and PyTorch eager for the FP32
models), alternated over rounds; INT8 speed-ups over each file's FP32 twin; each INT8 file's stem share of its time
(ORT CPU profile); the latency target's prediction beside its measurement."""

from __future__ import annotations

import sys
from pathlib import Path

from ..bench import BenchOptions, benchmark
from ..context import StageContext
from ..deploy import isa_warning
from ..figures import accuracy_latency_figure
from ..files import check_exported_onnx
from ..profile import profile_onnx
from ..recipe import BenchCfg
from ..report import accuracy_caveats
from ..rundir import PipelineError
from ..runtime import RUNTIMES
from ..tensorboard_log import log_bench, log_latency_check
from ..timing import ratio_of_rounds
from .export import onnx_sources


def bench_options(cfg: BenchCfg) -> BenchOptions:
    """The benchmark's options from the recipe's `bench` section."""
    return BenchOptions(batch_sizes=tuple(cfg.batch_sizes), main_batch=cfg.main_batch, threads=cfg.threads,
                        warmup=cfg.warmup, iters=cfg.iters, rounds=cfg.rounds, max_rounds=cfg.max_rounds,
                        runtimes=tuple(cfg.providers) if cfg.providers is not None else None)


def int8_speedups(results: list[dict], batch: int) -> dict:
    """FP32/INT8 latency of each quantized artifact against its own FP32 twin: the engine's ratio, the median of
    same-round ratios of fastest calls (`compress.timing.ratio_of_rounds`)."""
    rounds = {(r["artifact"], r["provider"]): r["round_fastest_ms"] for r in results if r["batch"] == batch}
    speedups = {}
    for (name, provider), int8 in rounds.items():
        fp32 = rounds.get((name.replace("_int8", "_fp32"), provider))
        if name.endswith("_int8") and fp32:
            speedups[f"{name}@{provider}"] = ratio_of_rounds(fp32, int8)
    return speedups


def _latency_check(c: StageContext, results: list[dict]) -> dict | None:
    """The prune stage's latency prediction beside the bench's measurement of the same file, runtime and batch
    (the pruned model in the table's precision), when the run pruned to a latency target and bench timed it: its
    fastest call, and the engine's ratio to the unpruned plain file of that precision (`compress.timing`), which
    `prune.keep_latency` aims at, as the prune stage's loop measured the plan (`prune.measure`)."""
    prune = c.summary["stages"].get("prune", {}).get("latency")
    if not prune:
        return None
    cfg = c.recipe.prune.latency
    artifact, reference = f"pruned_{cfg.precision}", f"plain_{cfg.precision}"
    rounds = {r["artifact"]: r for r in results if (r["provider"], r["batch"]) == (cfg.provider, cfg.batch)}
    measured = rounds.get(artifact)
    check = {"artifact": artifact, "provider": cfg.provider, "batch": cfg.batch, "budget_ms": prune["budget_ms"],
             "predicted_ms": prune["predicted_ms"], "measured_ms": measured and measured["fastest_ms"]}
    if measured and reference in rounds:
        check["measured_ratio"] = ratio_of_rounds(measured["round_fastest_ms"], rounds[reference]["round_fastest_ms"])
        check["target_ratio"] = prune["budget_ms"] / prune["before_ms"]
    return check


def run(c: StageContext) -> dict:
    cfg = c.recipe.bench
    artifacts = c.summary["stages"].get("export", {}).get("artifacts")
    if not c.dir.active("export") or not artifacts:
        raise PipelineError("bench needs the export stage's ONNX files: run export first")
    for entry in artifacts.values():  # a damaged or missing file is one line naming it, before any timing
        check_exported_onnx(entry["path"], entry.get("size_bytes"))
    paths = {name: Path(a["path"]) for name, a in artifacts.items()}
    for warning in filter(None, (isa_warning(p) for name, p in paths.items() if name.endswith("int8"))):
        print(warning, file=sys.stderr)
    reference = "plain_fp32" if "plain_fp32" in paths else None  # ratios: speed-up over the unpruned plain model
    # PyTorch eager beside ONNX Runtime: the FP32 models (the INT8 one only exists as fake-quant in PyTorch)
    eager = {name: c.load(stage) for name, stage in onnx_sources(c).items() if name.endswith("fp32") and name in paths}
    result = benchmark(paths, bench_options(cfg), cfg.image_size or c.data.cfg.image_size, torch_models=eager,
                       reference=reference, torch_device=c.device)
    main_batch = cfg.main_batch or cfg.batch_sizes[0]
    result["int8_speedup"] = int8_speedups(result["results"], main_batch)
    # what is left of an INT8 file's time in its 3-channel stem, which INT8 kernels barely speed up (ORT CPU profile)
    size = cfg.image_size or c.data.cfg.image_size
    result["stem_share"] = {name: profile_onnx(p, threads=cfg.threads, batch=main_batch, image_size=size,
                                               runs=cfg.iters, warmup=cfg.warmup)["stem"]["share"]
                            for name, p in paths.items() if name.endswith("int8")}
    predicted = _latency_check(c, result["results"])
    if predicted:
        result["prune_latency"] = predicted
    points = [{"name": r["artifact"], "latency_ms": r["fastest_ms"], "top1": artifacts[r["artifact"]]["top1"]}
              for r in result["results"]
              if r["batch"] == main_batch and r["provider"] == "cpu" and r["artifact"] in artifacts]
    if c.writer is not None and points:
        notes = accuracy_caveats(artifacts, c.data.num_classes)
        figure = accuracy_latency_figure(points, RUNTIMES["cpu"].label, main_batch, notes)
        log_bench(c.writer, result["results"], artifacts, figure, c.device.type, latency_target=predicted is not None)
        if predicted:
            log_latency_check(c.writer, predicted, c.device.type)
    return {**result, "curve": points}
