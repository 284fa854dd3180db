"""Latency of ONNX files as exported vs rewritten: their stem (compress.stem: channel padding to 4, 8 and 16,
space-to-depth where the stem has stride 2, an FP32 stem in an INT8 file) and the whole graph cleaned by onnxslim
(where it is installed).

    python benchmarks/graph_rewrites.py FILE.onnx [FILE.onnx ...] [--runtime cpu] [--threads 1] [--batch 1]
        [--rounds 7] [--iters 20] [--warmup 5]

Each round times every variant of a file in turn (the order rotating from round to round), the median of `--iters`
runs each; a variant's speed-up is the median over rounds of (original ms / variant ms) in the same round, so a
load change on the machine hits both alike. Also prints each variant's stem K (in_channels x kernel area), its node count and its
largest logit difference from the original on the timed batch."""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnx

from compress.runtime import open_onnx, time_runs
from compress.stem import STEM_REWRITES, conv_kernel, find_stem


def slim(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim's clean-up of the whole graph (Identity removal, constant folding, fusions)."""
    try:
        import onnxslim
    except ImportError as e:
        raise ValueError("onnxslim: not installed") from e
    return onnxslim.slim(model)


REWRITES = {**{k: v for k, v in STEM_REWRITES.items() if k != "none"}, "onnxslim": slim}


def stem_k(model: onnx.ModelProto) -> int:
    """The stem's reduction dimension: its kernel's in_channels x kh x kw."""
    return int(np.prod(conv_kernel(model.graph, find_stem(model)).dims[1:]))


def bench_file(path: Path, args: argparse.Namespace, tmp: Path) -> None:
    original = onnx.load(str(path))
    variants, skipped = {"original": original}, []
    for name, rewrite in REWRITES.items():
        try:
            variants[name] = rewrite(original)
        except ValueError as e:
            skipped.append(str(e))
    dims = original.graph.input[0].type.tensor_type.shape.dim
    x = np.random.default_rng(0).standard_normal((args.batch, *(d.dim_value for d in dims[1:]))).astype(np.float32)
    sessions = {}
    for name, model in variants.items():
        onnx.save(model, str(tmp / f"{name}.onnx"))
        sessions[name] = open_onnx(tmp / f"{name}.onnx", args.runtime, args.threads)
    reference = sessions["original"].logits(x)
    diffs = {name: float(np.abs(s.logits(x) - reference).max()) for name, s in sessions.items()}
    steps = {name: s.step(x) for name, s in sessions.items()}
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(statistics.median(time_runs(steps[name], args.warmup, args.iters)))
    print(f"\n{path}  ({args.runtime}, {x.shape[1]}x{x.shape[2]}x{x.shape[3]}, batch {args.batch}, "
          f"{args.threads} threads, {args.rounds} rounds x {args.iters} runs)")
    print(f"{'variant':16s} {'K':>5s} {'nodes':>6s} {'median ms':>10s} {'speed-up':>9s} {'max |dlogit|':>13s}")
    for name in names:
        speedup = statistics.median(o / t for o, t in zip(times["original"], times[name]))
        print(f"{name:16s} {stem_k(variants[name]):5d} {len(variants[name].graph.node):6d} "
              f"{statistics.median(times[name]):10.3f} {speedup:8.3f}x {diffs[name]:13.2e}")
    for line in skipped:
        print(f"  not applicable: {line}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--runtime", default="cpu", help="a runtime of ONNX files (compress.runtime.RUNTIMES)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.files:
            bench_file(path, args, Path(tmp))


if __name__ == "__main__":
    main()
