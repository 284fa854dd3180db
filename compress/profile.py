"""Where the time goes in an ONNX file: ONNX Runtime's CPU provider with its profiler on, kernel times per op type
and per node of the optimized graph (after ORT's fusions, so the names are ORT's), averaged per run. Where the
file's convs form one chain (a plain stack: each conv depends on the one before, so every executor runs them in the
file's order), each conv kernel is matched to its node in the file and gets its MACs and GMAC/s: how well the
kernel uses the CPU, layer by layer.

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
from .stem import conv_kernel

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


def _chain_conv_macs(path: Path, shape: tuple[int, int, int, int]) -> list[int] | None:
    """The MACs of each Conv of the file at input `shape` (output elements x in_channels / group x kernel area, as
    the graph is written: zero channels a stem rewrite added count), in the file's order; None unless each conv
    depends on the one before it, the one case where the kernels' run order is the file's."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path))
    for dim, size in zip(model.graph.input[0].type.tensor_type.shape.dim, shape):
        dim.Clear()
        dim.dim_value = size
    graph = shape_inference.infer_shapes(model).graph
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*graph.value_info, *graph.output)}
    ancestors: dict[str, set[int]] = {}  # tensor -> the indices of the convs it depends on
    macs: list[int] = []
    for node in graph.node:  # ONNX nodes are topologically sorted
        deps = set().union(*(ancestors.get(t, set()) for t in node.input))
        if node.op_type == "Conv":
            i = len(macs)  # this conv's index
            if i and i - 1 not in deps:
                return None
            try:
                kernel = conv_kernel(graph, node).dims
            except ValueError:  # a kernel computed in the graph
                return None
            out = dims.get(node.output[0])
            if not out or 0 in out:
                return None
            macs.append(int(np.prod(out)) * int(np.prod(kernel[1:])))
            deps = deps | {i}
        for t in node.output:
            ancestors[t] = deps
    return macs


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
        shape = _input_shape(session, path, batch, image_size)
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
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
    conv_nodes = [k for k in by_node if _is_conv(op_of[k])]  # by_node is in first-run order: kernels sorted by time
    macs = _chain_conv_macs(path, shape)
    if macs is not None and len(macs) != len(conv_nodes):
        macs = None  # ORT fused or split a conv: no one-to-one match
    convs = [{"node": k, "op": op_of[k], "us": by_node[k] / runs,
              **({"macs": macs[i], "gmacs": macs[i] / (by_node[k] / runs) / 1e3} if macs else {})}
             for i, k in enumerate(conv_nodes)]
    return {
        "total_us": total / runs,
        "run_us": sum(e["dur"] for e in model_runs) / runs,
        "by_op": [{"op": k, "us": us, "share": s} for k, us, s in _shares(by_op, runs, total)],
        "by_node": [{"node": k, "op": op_of[k], "us": us, "share": s} for k, us, s in _shares(by_node, runs, total)],
        "stem": {"node": stem, "us": by_node[stem] / runs, "share": by_node[stem] / total if total else 0.0},
        "convs": convs,
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
    convs = result["convs"]
    if convs and "gmacs" in convs[0]:
        width = max(len(c["node"]) for c in convs) + 2
        lines += ["", f"{'conv (run order)':<{width}}{'MACs (M)':>10}{'us/run':>10}{'GMAC/s':>9}"]
        lines += [f"{c['node']:<{width}}{c['macs'] / 1e6:>10.1f}{c['us']:>10.1f}{c['gmacs']:>9.0f}" for c in convs]
        rest = convs[1:]
        if rest:
            rate = sum(c["macs"] for c in rest) / sum(c["us"] for c in rest) / 1e3
            lines.append(f"stem {convs[0]['gmacs']:.0f} GMAC/s, the other convs together {rate:.0f} GMAC/s")
    stem = result["stem"]
    lines += ["", f"stem: {stem['node']}  {stem['us']:.1f} us/run  {stem['share']:.1%} of kernel time"]
    return "\n".join(lines)
