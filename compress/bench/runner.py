"""The benchmark loop: one session (or compiled or torch model) alive at a time, artifacts alternated over
rounds, medians and per-round ratios."""

from __future__ import annotations

import copy
import gc
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.export import available_providers, onnx_session
from compress.recipe import BenchCfg

from .machine import machine_info
from .runtimes import onnx_runner, onnx_timing, openvino_unavailable, time_runs, torch_step


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


class _Job:
    """One thing to time: an ONNX artifact on an ORT provider or on OpenVINO, or a torch model run eagerly on
    `device`."""

    def __init__(
        self,
        name: str,
        provider: str,
        path: Path | None = None,
        model: nn.Module | None = None,
        device: torch.device | None = None,
    ):
        self.name, self.provider, self.path, self.model, self.device = name, provider, path, model, device

    @property
    def timing(self) -> str:
        if self.model is not None:
            sync = ", synchronized" if self.device.type == "cuda" else ""
            return f"torch eager, input on {self.device}{sync}"
        return onnx_timing(self.provider)

    def open(self, threads: int | None) -> Callable[[np.ndarray], Callable[[], object]]:
        """Start the ORT session, OpenVINO model or torch model: returns `prepare(batch) -> step`, `step()` being
        one timed call."""
        if self.model is None:
            return onnx_runner(self.path, self.provider, threads)
        return lambda x: torch_step(self.model, x, self.device)


def _resolve_providers(
    cfg: BenchCfg, artifacts: dict[str, Path], torch_models: dict, threads: int | None, torch_device: torch.device
) -> tuple[list[str], dict[str, str]]:
    """The providers to time, and {provider: why skipped} for those asked for that cannot run here. A GPU
    provider is tried once on the first artifact: ORT lists CUDA/TensorRT whenever it was built with them.
    With `cfg.providers` None, OpenVINO is in only where it can run."""
    here = available_providers()
    if cfg.providers is None:
        wanted = list(here) + ([] if openvino_unavailable() else ["openvino"]) + (["torch"] if torch_models else [])
    else:
        wanted = list(dict.fromkeys(cfg.providers))
    providers, skipped = [], {}
    for p in wanted:
        if p == "torch" and torch_device.type == "cuda" and not torch.cuda.is_available():
            skipped[p] = "torch_device is cuda, and CUDA is not available here"
        elif p == "torch":
            providers.append(p)
        elif p == "openvino":
            why = openvino_unavailable()
            if why:
                skipped[p] = why
            else:
                providers.append(p)
        elif p not in here:
            skipped[p] = "not available here"
        elif p != "cpu" and artifacts:
            try:
                probe = onnx_session(next(iter(artifacts.values())), p, threads)
                del probe
                providers.append(p)
            except (ValueError, RuntimeError) as e:
                skipped[p] = str(e).splitlines()[0] if str(e) else type(e).__name__
        else:
            providers.append(p)
    return providers, skipped


def benchmark(
    artifacts: dict[str, Path],
    cfg: BenchCfg,
    image_size: int,
    torch_models: dict[str, nn.Module] | None = None,
    reference: str | None = None,
    torch_device: str | torch.device = "cpu",
) -> dict:
    """Latency of each ONNX artifact on each ORT provider asked for in `cfg.providers` and available here (CPU
    always) and on OpenVINO's CPU device (provider 'openvino', where the package is installed), and of each torch
    model (provider 'torch', eager on `torch_device`), for every batch size of `cfg.batch_sizes`. What a timed call
    covers is in each result's `timing` (see the module's docstring).

    `reference` names the artifact the ratios divide by (default: the first artifact, else the first torch model).
    Returns {"results": [{artifact, provider, batch, median_ms, p90_ms, images_per_s, round_medians_ms, timing}],
    "ratios": {"<name>/<reference>": median ratio at the main batch on CPU (else the first provider); others get
    an "@provider" suffix}, "ratio_details": [...], "machine": {..., "skipped_providers": {provider: why}}}.
    A provider asked for but unable to run here is skipped (and said so in machine.skipped_providers), not an
    error; without GPU providers an ONNX session is always on CPU.
    """
    torch_models = dict(torch_models or {})
    torch_device = torch.device(torch_device)
    artifacts = {name: Path(p) for name, p in artifacts.items()}
    for name, p in artifacts.items():
        if not p.is_file():
            raise FileNotFoundError(f"benchmark: artifact '{name}' not found: {p}")
    providers, skipped = _resolve_providers(cfg, artifacts, torch_models, cfg.threads, torch_device)
    jobs: list[_Job] = []
    for provider in providers:
        if provider == "torch":
            jobs += [
                _Job(name, "torch", model=copy.deepcopy(m).to(torch_device).eval(), device=torch_device)
                for name, m in torch_models.items()
            ]
        else:
            jobs += [_Job(name, provider, path=p) for name, p in artifacts.items()]
    if not jobs:
        raise ValueError("benchmark: nothing to measure (no artifacts or torch models for the asked providers)")
    batch_sizes = list(dict.fromkeys(cfg.batch_sizes))
    main_batch = cfg.main_batch if cfg.main_batch is not None else batch_sizes[0]
    if main_batch not in batch_sizes:
        raise ValueError(f"bench.main_batch={main_batch} is not one of bench.batch_sizes={batch_sizes}")
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, 3, image_size, image_size), dtype=np.float32) for b in batch_sizes}

    torch_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    times: dict[tuple[str, str, int], list[list[float]]] = {}
    timing = {(job.name, job.provider): job.timing for job in jobs}
    try:
        for rnd in range(cfg.rounds):
            shift = rnd % len(jobs)
            for job in jobs[shift:] + jobs[:shift]:
                prepare = job.open(cfg.threads)
                for b in batch_sizes:
                    t = time_runs(prepare(inputs[b]), cfg.warmup, cfg.iters)
                    times.setdefault((job.name, job.provider, b), []).append(t)
                del prepare  # the only reference to the session: it is freed before the next one starts
                gc.collect()
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
                "timing": timing[(name, provider)],
            }
        )
    ratios, details = _ratios(times, providers, batch_sizes, main_batch, artifacts, torch_models, reference)
    return {
        "results": results,
        "ratios": ratios,
        "ratio_details": details,
        "main_batch": main_batch,
        "machine": {**machine_info(cfg.threads, providers), "skipped_providers": skipped},
        "settings": {"warmup": cfg.warmup, "iters": cfg.iters, "rounds": cfg.rounds, "image_size": image_size},
    }


def _ratios(times, providers, batch_sizes, main_batch, artifacts, torch_models, reference):
    ratios, details = {}, []
    primary = "cpu" if "cpu" in providers else providers[0]
    for provider in providers:
        names = list(torch_models) if provider == "torch" else list(artifacts)
        ref = reference if reference in names else (names[0] if names else None)
        if ref is None:
            continue
        for b in batch_sizes:
            ref_rounds = [statistics.median(r) for r in times[(ref, provider, b)]]
            for name in names:
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
