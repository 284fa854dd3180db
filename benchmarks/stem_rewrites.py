"""ORT CPU latency of ONNX files as exported vs with their stem rewritten (compress.stem): channel padding to 4, 8
and 16, and space-to-depth where the stem has stride 2.

    python benchmarks/stem_rewrites.py FILE.onnx [FILE.onnx ...] [--threads 1] [--batch 1] [--rounds 7]
        [--iters 20] [--warmup 5]

Each round times every variant of a file in turn (the order rotating from round to round), the median of `--iters`
runs each; a variant's speed-up is the median over rounds of (original ms / variant ms) in the same round, so a
load change on the machine hits both alike. Also prints each variant's stem K (in_channels x kernel area) and its
largest logit difference from the original on the timed batch."""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnx

from compress.runtime import open_onnx, time_runs
from compress.stem import PAD_CHANNELS, find_stem, pad_channels, space_to_depth

REWRITES = {**{f"pad{c}": (lambda m, c=c: pad_channels(m, c)) for c in PAD_CHANNELS}, "space_to_depth": space_to_depth}


def stem_k(model: onnx.ModelProto) -> int:
    """The stem's reduction dimension: its kernel's in_channels x kh x kw."""
    producer = {out: node for node in model.graph.node for out in node.output}
    name = find_stem(model).input[1]
    if name in producer and producer[name].op_type == "DequantizeLinear":
        name = producer[name].input[0]
    dims = next(init.dims for init in model.graph.initializer if init.name == name)
    return int(np.prod(dims[1:]))


def bench_file(path: Path, args: argparse.Namespace, tmp: Path) -> None:
    original = onnx.load(str(path))
    variants, skipped = {"original": original}, []
    for name, rewrite in REWRITES.items():
        try:
            variants[name] = rewrite(original)
        except ValueError as e:
            skipped.append(f"{name}: {e}")
    dims = original.graph.input[0].type.tensor_type.shape.dim
    x = np.random.default_rng(0).standard_normal((args.batch, *(d.dim_value for d in dims[1:]))).astype(np.float32)
    sessions = {}
    for name, model in variants.items():
        onnx.save(model, str(tmp / f"{name}.onnx"))
        sessions[name] = open_onnx(tmp / f"{name}.onnx", "cpu", args.threads)
    reference = sessions["original"].logits(x)
    diffs = {name: float(np.abs(s.logits(x) - reference).max()) for name, s in sessions.items()}
    steps = {name: s.step(x) for name, s in sessions.items()}
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(statistics.median(time_runs(steps[name], args.warmup, args.iters)))
    print(f"\n{path}  ({x.shape[1]}x{x.shape[2]}x{x.shape[3]}, batch {args.batch}, {args.threads} threads, "
          f"{args.rounds} rounds x {args.iters} runs)")
    print(f"{'variant':16s} {'K':>5s} {'median ms':>10s} {'speed-up':>9s} {'max |dlogit|':>13s}")
    for name in names:
        speedup = statistics.median(o / t for o, t in zip(times["original"], times[name]))
        print(f"{name:16s} {stem_k(variants[name]):5d} {statistics.median(times[name]):10.3f} {speedup:8.3f}x "
              f"{diffs[name]:13.2e}")
    for line in skipped:
        print(f"  not applicable: {line}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
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
