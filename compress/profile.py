"""Where the time goes in an ONNX file: ONNX Runtime's CPU provider with its profiler on, kernel times per op type
and per node of the optimized graph (after ORT's fusions, so the names are ORT's), averaged per run.

Warm-up runs go through the same session as the profiled ones (a second session would not warm this one's arena
and thread pool), and their events are dropped: every run writes one "model_run" Session event, so the node events
before the first profiled run's "model_run" start belong to the warm-up."""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from .errors import UserError

KERNEL = "_kernel_time"


class ProfileError(UserError, ValueError):
    """A file that cannot be profiled, or settings that cannot be run."""


def _is_conv(op: str) -> bool:
    """Conv, FusedConv, NhwcFusedConv, QLinearConv, ConvInteger: the conv kernels ORT's CPU provider runs."""
    return "Conv" in op


def _session(path: Path, threads: int | None, prefix: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 4  # fatal only: a failed load is raised, not also logged ("could not write a profile")
    opts.enable_profiling, opts.profile_file_prefix = True, prefix
    if threads is not None:
        opts.intra_op_num_threads, opts.inter_op_num_threads = int(threads), 1
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own pybind types (InvalidProtobuf, Fail, ...)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ProfileError(f"{path} is not an ONNX file ONNX Runtime can load ({reason})") from None


def _input_shape(session, path: Path, batch: int, image_size: int | None) -> tuple[int, int, int, int]:
    if image_size is not None:
        return batch, 3, image_size, image_size
    h, w = session.get_inputs()[0].shape[2:4]
    if not (isinstance(h, int) and isinstance(w, int)):
        raise ProfileError(f"{path}: the input size is not fixed in the file ({h}x{w}); give an image size")
    return batch, 3, h, w


def _shares(totals: dict, runs: int, total: float) -> list[tuple]:
    """(key, us per run, share) sorted by time, largest first."""
    return sorted(((k, v / runs, v / total if total else 0.0) for k, v in totals.items()), key=lambda t: -t[1])


def profile_onnx(path: str | Path, threads: int | None = None, batch: int = 8, image_size: int | None = None,
                 runs: int = 20, warmup: int = 5) -> dict:
    """Kernel time of `path` on random float32 input of shape (batch, 3, S, S), per op type and per node, averaged
    over `runs` profiled runs after `warmup` untimed ones; shares are of the summed kernel time. S is `image_size`,
    else the file's static input size. `run_us` is the mean wall time of a whole run (kernels + executor)."""
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"no such file: {path}")
    for name, value, least in (("batch", batch, 1), ("runs", runs, 1), ("warmup", warmup, 0),
                               ("threads", threads, 1), ("image_size", image_size, 1)):
        if value is not None and value < least:
            raise ProfileError(f"profile: {name} must be >= {least}, got {value}")
    with tempfile.TemporaryDirectory() as tmp:
        session = _session(path, threads, str(Path(tmp) / "ort"))
        x = np.random.default_rng(0).random(_input_shape(session, path, batch, image_size), dtype=np.float32)
        feed = {session.get_inputs()[0].name: x}
        for _ in range(warmup + runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    model_runs = sorted((e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"),
                        key=lambda e: e["ts"])[warmup:]
    start = model_runs[0]["ts"]
    kernels = sorted((e for e in events if e.get("cat") == "Node" and e["name"].endswith(KERNEL) and e["ts"] >= start),
                     key=lambda e: e["ts"])
    by_op, by_node, op_of = defaultdict(float), defaultdict(float), {}
    for e in kernels:
        op = e["args"].get("op_name", "?")
        node = e["name"][: -len(KERNEL)] or f"<{op} {e['args'].get('node_index', '?')}>"
        by_op[op] += e["dur"]
        by_node[node] += e["dur"]
        op_of[node] = op
    total = sum(by_op.values())
    # The stem is the first conv-like kernel of a run: the sequential executor runs nodes in a topological order,
    # and in a plain stack every conv depends on the one before, so the first conv to run is the one the input
    # reaches; before it run only nodes that reformat the input (QuantizeLinear, Transpose, ReorderInput) or do not
    # read it (a weight's DequantizeLinear). Matching by name would not do: ORT's fusions rename nodes
    # (".../Relu_output_0_nchwc", ".../Conv_token_1") and change their op types (Conv -> FusedConv, QLinearConv).
    first = next((e for e in kernels if _is_conv(e["args"].get("op_name", ""))), None)
    if first is None:
        raise ProfileError(f"{path}: no convolution ran (ops: {', '.join(sorted(by_op))})")
    stem = first["name"][: -len(KERNEL)]
    return {
        "total_us": total / runs,
        "run_us": sum(e["dur"] for e in model_runs) / runs,
        "by_op": [{"op": k, "us": us, "share": s} for k, us, s in _shares(by_op, runs, total)],
        "by_node": [{"node": k, "op": op_of[k], "us": us, "share": s} for k, us, s in _shares(by_node, runs, total)],
        "stem": {"node": stem, "us": by_node[stem] / runs, "share": by_node[stem] / total if total else 0.0},
    }


def format_profile(result: dict, top: int = 15) -> str:
    """The per-op-type shares, the `top` slowest nodes and the stem's share, as a text table."""
    lines = [f"kernel time {result['total_us']:.0f} us per run (whole run {result['run_us']:.0f} us)", "",
             f"{'op':<28}{'us/run':>12}{'share':>9}"]
    lines += [f"{r['op']:<28}{r['us']:>12.1f}{r['share']:>8.1%}" for r in result["by_op"]]
    nodes = result["by_node"][:top]
    width = max([len(r["node"]) for r in nodes] + [4]) + 2
    lines += ["", f"{'node':<{width}}{'op':<20}{'us/run':>12}{'share':>9}"]
    lines += [f"{r['node']:<{width}}{r['op']:<20}{r['us']:>12.1f}{r['share']:>8.1%}" for r in nodes]
    if len(result["by_node"]) > top:
        lines.append(f"... {len(result['by_node']) - top} more nodes")
    stem = result["stem"]
    lines += ["", f"stem: {stem['node']}  {stem['us']:.1f} us/run  {stem['share']:.1%} of kernel time"]
    return "\n".join(lines)
