"""The benchmark loop: one session (or compiled or torch model) alive at a time, artifacts alternated over
rounds, medians and per-round ratios."""

from __future__ import annotations

import gc
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.runtime import RUNTIMES, Runtime, get_runtime, machine_info, time_runs

# A round whose fastest call of a (artifact, runtime, batch) is more than this above its fastest round was disturbed
# by other work. On a 2-core Zen 5 VM, an INT8 file timed each second for three minutes ran within 6% of 0.26 ms for
# 15-80 s at a time, then 1.5-2x slower for 20-45 s (a neighbour's work; FP32 files slow far less): within a quiet
# stretch a file runs as it does alone, and a fixed number of rounds may give some files few quiet ones.
DISTURBED = 1.10
QUIET_ROUNDS = 3  # undisturbed rounds of every (artifact, runtime, batch) that `BenchOptions.max_rounds` waits for


def undisturbed(round_fastest: list[float]) -> list[bool]:
    """Which rounds timed a job undisturbed: their fastest call within DISTURBED of its fastest over all rounds."""
    at_most = DISTURBED * min(round_fastest)
    return [t <= at_most for t in round_fastest]


@dataclass(frozen=True)
class BenchOptions:
    """What `benchmark` times: every batch size of `batch_sizes` (`main_batch`, default the first, is the one the
    ratios are read at), on `threads` threads (None: all cores), `warmup` untimed and `iters` timed calls per
    (artifact, runtime, batch) in each of `rounds` rounds, on `runtimes` (names in compress.runtime.RUNTIMES; None:
    every one that can run here). With `max_rounds` above `rounds`, more rounds follow, up to `max_rounds` in all,
    until every (artifact, runtime, batch) has QUIET_ROUNDS undisturbed ones (`undisturbed`): other work on a shared
    machine can cover most of a fixed number of rounds."""

    batch_sizes: tuple[int, ...] = (8,)
    main_batch: int | None = None
    threads: int | None = None
    warmup: int = 10
    iters: int = 20
    rounds: int = 3
    runtimes: tuple[str, ...] | None = None
    max_rounds: int | None = None

    def __post_init__(self):  # lists, as a recipe gives them, become tuples: the options stay immutable
        object.__setattr__(self, "batch_sizes", tuple(self.batch_sizes))
        if self.runtimes is not None:
            object.__setattr__(self, "runtimes", tuple(self.runtimes))


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _resolve_runtimes(
    options: BenchOptions, sources: dict[str, dict], torch_device: torch.device
) -> tuple[list[Runtime], dict[str, str]]:
    """The runtimes to time, and {runtime: why skipped} for those asked for that cannot run here. `sources` gives
    what each kind of runtime opens ({"onnx": artifacts, "torch": torch models}); a runtime that may list a device
    it cannot start tries it on its first one. With `options.runtimes` None: every runtime that has something to
    run, those that cannot run on this machine at all left out without a word."""
    asked = options.runtimes is not None
    names = list(dict.fromkeys(options.runtimes)) if asked else list(RUNTIMES)
    runtimes, skipped = [], {}
    for name in names:
        runtime = get_runtime(name)
        mine = sources[runtime.opens]
        if not asked and (not mine or runtime.unavailable() is not None):
            continue
        why = runtime.unavailable(torch_device, next(iter(mine.values()), None))
        if why:
            skipped[name] = why
        else:
            runtimes.append(runtime)
    return runtimes, skipped


def benchmark(
    artifacts: dict[str, Path],
    options: BenchOptions,
    image_size: int,
    torch_models: dict[str, nn.Module] | None = None,
    reference: str | None = None,
    torch_device: str | torch.device = "cpu",
) -> dict:
    """Latency of each ONNX artifact on each runtime of `options.runtimes` that opens ONNX files and can run here
    (ONNX Runtime's providers, OpenVINO's CPU device), and of each torch model on PyTorch eager ('torch', on
    `torch_device`), for every batch size of `options.batch_sizes`, on random images of `image_size`. What a timed
    call covers is in each result's `timing` (see the package's docstring).

    `reference` names the artifact the ratios divide by (default: the first artifact, else the first torch model).
    Returns {"results": [{artifact, provider, batch, median_ms, p90_ms, images_per_s, round_medians_ms,
    round_fastest_ms (each round's fastest call), timing}],
    "ratios": {"<name>/<reference>": median ratio at the main batch on CPU (else the first runtime); others get
    an "@runtime" suffix}, "ratio_details": [...], "machine": {..., "skipped_providers": {runtime: why}}}.
    A runtime asked for but unable to run here is skipped (and said so in machine.skipped_providers), not an
    error; without GPU runtimes an ONNX session is always on CPU.
    """
    torch_device = torch.device(torch_device)
    artifacts = {name: Path(p) for name, p in artifacts.items()}
    for name, p in artifacts.items():
        if not p.is_file():
            raise FileNotFoundError(f"benchmark: artifact '{name}' not found: {p}")
    sources = {"onnx": artifacts, "torch": dict(torch_models or {})}
    runtimes, skipped = _resolve_runtimes(options, sources, torch_device)
    jobs = [(name, runtime, model) for runtime in runtimes for name, model in sources[runtime.opens].items()]
    if not jobs:
        raise ValueError("benchmark: nothing to measure (no artifacts or torch models for the asked runtimes)")
    batch_sizes = list(dict.fromkeys(options.batch_sizes))
    main_batch = options.main_batch if options.main_batch is not None else batch_sizes[0]
    if main_batch not in batch_sizes:
        raise ValueError(f"bench.main_batch={main_batch} is not one of bench.batch_sizes={batch_sizes}")
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, 3, image_size, image_size), dtype=np.float32) for b in batch_sizes}

    torch_threads = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)  # torch eager's threads are the process's
    times: dict[tuple[str, str, int], list[list[float]]] = {}
    timing: dict[tuple[str, str], str] = {}
    rnd = 0
    try:
        while rnd < options.rounds or (rnd < (options.max_rounds or 0) and not _settled(times)):
            shift = rnd % len(jobs)
            for name, runtime, model in jobs[shift:] + jobs[:shift]:
                session = runtime.open(model, options.threads, torch_device)
                timing[(name, runtime.name)] = session.timing
                for b in batch_sizes:
                    t = time_runs(session.step(inputs[b]), options.warmup, options.iters)
                    times.setdefault((name, runtime.name, b), []).append(t)
                del session  # the only reference to the session: it is freed before the next one starts
                gc.collect()
            rnd += 1
    finally:
        torch.set_num_threads(torch_threads)

    results = []
    for (name, provider, b), rounds in times.items():
        med = statistics.median(statistics.median(r) for r in rounds)
        results.append(
            {
                "artifact": name,
                "provider": provider,
                "batch": b,
                "median_ms": med,
                "p90_ms": _percentile([t for r in rounds for t in r], 90),
                "images_per_s": b / (med / 1000.0),
                "round_medians_ms": [statistics.median(r) for r in rounds],
                "round_fastest_ms": [min(r) for r in rounds],
                "timing": timing[(name, provider)],
            }
        )
    names = {runtime.name: list(sources[runtime.opens]) for runtime in runtimes}
    ratios, details = _ratios(times, names, batch_sizes, main_batch, reference)
    return {
        "results": results,
        "ratios": ratios,
        "ratio_details": details,
        "main_batch": main_batch,
        "machine": {**machine_info(options.threads, list(names)), "skipped_providers": skipped},
        "settings": {"warmup": options.warmup, "iters": options.iters, "rounds": rnd,
                     "image_size": image_size},
    }


def _settled(times: dict[tuple[str, str, int], list[list[float]]]) -> bool:
    """Whether every timed (artifact, runtime, batch) has QUIET_ROUNDS undisturbed rounds."""
    return all(sum(undisturbed([min(r) for r in rounds])) >= QUIET_ROUNDS for rounds in times.values())


def _ratios(times: dict, names: dict[str, list[str]], batch_sizes: list[int], main_batch: int,
            reference: str | None) -> tuple[dict, list]:
    """Per-round latency ratios of each runtime's models (`names`: {runtime: its models}) against its reference."""
    ratios, details = {}, []
    primary = "cpu" if "cpu" in names else next(iter(names))
    for provider, models in names.items():
        ref = reference if reference in models else (models[0] if models else None)
        if ref is None:
            continue
        for b in batch_sizes:
            ref_rounds = [statistics.median(r) for r in times[(ref, provider, b)]]
            for name in models:
                if name == ref:
                    continue
                per_round = [
                    statistics.median(r) / rt for r, rt in zip(times[(name, provider, b)], ref_rounds, strict=True)
                ]
                value = statistics.median(per_round)
                details.append(
                    {
                        "ratio": f"{name}/{ref}",
                        "provider": provider,
                        "batch": b,
                        "per_round": per_round,
                        "median": value,
                    }
                )
                if b == main_batch:
                    ratios[f"{name}/{ref}" + ("" if provider == primary else f"@{provider}")] = value
    return ratios, details
