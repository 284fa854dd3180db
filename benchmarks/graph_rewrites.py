"""Latency of ONNX files as exported vs rewritten: their stem (compress.stem: channel padding to 4, 8 and 16,
space-to-depth where the stem has stride 2, an FP32 stem in an INT8 file) and the whole graph cleaned by onnxslim
(where it is installed).

    python benchmarks/graph_rewrites.py FILE.onnx [FILE.onnx ...] [--runtime cpu] [--threads 1] [--batch 1]
        [--rounds 7] [--iters 20] [--warmup 5] [--report docs/results/graph_rewrites.md]

The variants of a file are timed by the engine (`compress.timing`, defaults `GRAPH_REWRITES`): alternating rounds,
one session alive at a time; a variant's latency is its fastest call, its speed-up the median over rounds of
(original / variant) of the fastest calls in the same round, so a load change on the machine hits both alike. Also
prints each variant's stem K (in_channels x kernel area), its node count and its largest logit difference from the
original on the timed batch."""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import onnx

from compress.results import Transcript
from compress.runtime import open_onnx
from compress.stem import STEM_REWRITES, conv_kernel, find_stem
from compress.timing import GRAPH_REWRITES, ratio, run_rounds


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


def bench_file(path: Path, args: argparse.Namespace, tmp: Path, out: Transcript) -> None:
    original = onnx.load(str(path))
    variants, skipped = {"original": original}, []
    for name, rewrite in REWRITES.items():
        try:
            variants[name] = rewrite(original)
        except ValueError as e:
            skipped.append(str(e))
    dims = original.graph.input[0].type.tensor_type.shape.dim
    x = np.random.default_rng(0).standard_normal((args.batch, *(d.dim_value for d in dims[1:]))).astype(np.float32)
    paths = {}
    for name, model in variants.items():
        paths[name] = tmp / f"{name}.onnx"
        onnx.save(model, str(paths[name]))
    reference = open_onnx(paths["original"], args.runtime, args.threads).logits(x)
    diffs = {name: float(np.abs(open_onnx(p, args.runtime, args.threads).logits(x) - reference).max())
             for name, p in paths.items()}

    def opener(name: str):
        return lambda: {name: open_onnx(paths[name], args.runtime, args.threads).step(x)}

    counts = dataclasses.replace(GRAPH_REWRITES, warmup=args.warmup, iters=args.iters, rounds=args.rounds)
    timed = run_rounds({name: opener(name) for name in paths}, counts)
    out.say(f"\n{path}  ({args.runtime}, {x.shape[1]}x{x.shape[2]}x{x.shape[3]}, batch {args.batch}, "
          f"{args.threads} threads, {args.rounds} rounds x {args.iters} runs)")
    out.say(f"{'variant':16s} {'K':>5s} {'nodes':>6s} {'fastest ms':>10s} {'median ms':>10s} {'speed-up':>9s} "
          f"{'max |dlogit|':>13s}")
    for name in paths:
        speedup = ratio(timed["original"], timed[name])
        out.say(f"{name:16s} {stem_k(variants[name]):5d} {len(variants[name].graph.node):6d} "
              f"{timed[name].fastest:10.3f} {timed[name].median:10.3f} {speedup:8.3f}x {diffs[name]:13.2e}")
    for line in skipped:
        out.say(f"  not applicable: {line}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--runtime", default="cpu", help="a runtime of ONNX files (compress.runtime.RUNTIMES)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=GRAPH_REWRITES.rounds)
    ap.add_argument("--iters", type=int, default=GRAPH_REWRITES.iters)
    ap.add_argument("--warmup", type=int, default=GRAPH_REWRITES.warmup)
    ap.add_argument("--report", type=Path, metavar="PATH.md", help="also write the output as a published report")
    args = ap.parse_args()
    out = Transcript()
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.files:
            bench_file(path, args, Path(tmp), out)
    out.publish(args.report, "ONNX graph rewrites: stem and whole-graph latency")


if __name__ == "__main__":
    main()
