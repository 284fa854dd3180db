"""The benchmark: every file on every runtime asked for, timed by the one engine (`compress.timing`) in
alternating rounds, one session (or compiled or torch model) alive at a time; each file's fastest call and the
median of per-round ratios of fastest calls."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.runtime import RUNTIMES, Runtime, get_runtime, machine_info
from compress.timing import BENCH, Counts, Opener, Timings, ratio, round_ratios, run_rounds


@dataclass(frozen=True)
class BenchOptions:
    """What `benchmark` times: every batch size of `batch_sizes` (`main_batch`, default the first, is the one the
    ratios are read at), on `threads` threads (None: all cores), `warmup` untimed and `iters` timed calls per
    (artifact, runtime, batch) in each of `rounds` rounds, on `runtimes` (names in compress.runtime.RUNTIMES; None:
    every one that can run here). With `max_rounds` above `rounds`, more rounds follow, up to `max_rounds` in all,
    until every (artifact, runtime, batch) has `compress.timing.QUIET_ROUNDS` undisturbed ones. Defaults:
    `compress.timing.BENCH`."""

    batch_sizes: tuple[int, ...] = (8,)
    main_batch: int | None = None
    threads: int | None = None
    warmup: int = BENCH.warmup
    iters: int = BENCH.iters
    rounds: int = BENCH.rounds
    runtimes: tuple[str, ...] | None = None
    max_rounds: int | None = BENCH.max_rounds

    def __post_init__(self):  # lists, as a recipe gives them, become tuples: the options stay immutable
        object.__setattr__(self, "batch_sizes", tuple(self.batch_sizes))
        if self.runtimes is not None:
            object.__setattr__(self, "runtimes", tuple(self.runtimes))

    @property
    def counts(self) -> Counts:
        """The engine's counts for these options."""
        return Counts(self.warmup, self.iters, self.rounds, self.max_rounds, BENCH.why)


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
    Returns {"results": [{artifact, provider, batch, fastest_ms (the latency: the fastest call of every round),
    median_ms (the median of each round's median), p90_ms (of every call), images_per_s (at fastest_ms),
    round_medians_ms, round_fastest_ms (each round's median and fastest call), timing}],
    "ratios": {"<name>/<reference>": the median of same-round ratios of fastest calls (`compress.timing.ratio`) at
    the main batch on CPU (else the first runtime); others get an "@runtime" suffix}, "ratio_details": [...],
    "machine": {..., "skipped_providers": {runtime: why}}}.
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

    timing: dict[tuple[str, str], str] = {}

    def opener(name: str, runtime: Runtime, model: Path | nn.Module) -> Opener:
        def open_job() -> dict:
            session = runtime.open(model, options.threads, torch_device)
            timing[(name, runtime.name)] = session.timing
            # one step per batch size; what they hold of the session lives until the engine drops them
            return {(name, runtime.name, b): session.step(inputs[b]) for b in batch_sizes}

        return open_job

    torch_threads = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)  # torch eager's threads are the process's
    try:
        times = run_rounds({(name, runtime.name): opener(name, runtime, model) for name, runtime, model in jobs},
                           options.counts)
    finally:
        torch.set_num_threads(torch_threads)

    results = []
    for (name, provider, b), series in times.items():
        results.append(
            {
                "artifact": name,
                "provider": provider,
                "batch": b,
                "fastest_ms": series.fastest,
                "median_ms": series.median,
                "p90_ms": series.percentile(90),
                "images_per_s": b / (series.fastest / 1000.0),
                "round_medians_ms": series.round_medians,
                "round_fastest_ms": series.round_fastest,
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
        "settings": {"warmup": options.warmup, "iters": options.iters, "rounds": times.rounds,
                     "image_size": image_size},
    }


def _ratios(times: Timings, names: dict[str, list[str]], batch_sizes: list[int], main_batch: int,
            reference: str | None) -> tuple[dict, list]:
    """Per-round latency ratios of each runtime's models (`names`: {runtime: its models}) against its reference,
    and the product's ratio of each (`compress.timing.ratio`)."""
    ratios, details = {}, []
    primary = "cpu" if "cpu" in names else next(iter(names))
    for provider, models in names.items():
        ref = reference if reference in models else (models[0] if models else None)
        if ref is None:
            continue
        for b in batch_sizes:
            denominator = times[(ref, provider, b)]
            for name in models:
                if name == ref:
                    continue
                per_round = round_ratios(times[(name, provider, b)], denominator)
                value = ratio(times[(name, provider, b)], denominator)
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
