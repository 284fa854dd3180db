"""Latency benchmark of exported ONNX artifacts and PyTorch eager models on the runtimes of `compress.runtime`
(ONNX Runtime, OpenVINO on CPU when installed, PyTorch eager), and the accuracy-latency figure.

Measurement rules, so that two artifacts are compared fairly on a shared machine (the engine,
`compress.timing`, and docs/timing.md):
- one ORT session (or OpenVINO compiled model, or torch model) is alive at a time: created, warmed up, timed, then
  dropped;
- artifacts are alternated over `options.rounds` rounds (the starting artifact moves each round), so slow drifts
  of the machine (thermal, other jobs) hit every artifact alike;
- a file's latency (`fastest_ms`) is its fastest call over all rounds: other work only ever adds time; each
  round's fastest call and median are kept (`round_fastest_ms`, `round_medians_ms`), the median of the medians is
  `median_ms`, p90 is over every timed call of every round;
- with `options.max_rounds`, rounds continue past `options.rounds` until every (artifact, runtime, batch) has
  `QUIET_ROUNDS` undisturbed ones (their fastest call within `DISTURBED` of its fastest round), at most
  `max_rounds` in all: on a shared machine other work comes in stretches that can cover most of a fixed count;
- `ratios` are latency ratios artifact / reference (below 1: faster than the reference): within each round, of
  the two fastest calls, then the median over rounds.

What one timed call covers (each result's `timing` says which): on the CPU provider, `session.run` on a host
array; on CUDA and TensorRT, `run_with_iobinding` with the input copied to the GPU once, before timing, and the
output bound on the GPU, so host<->device copies are not timed; on OpenVINO (provider 'openvino', the `openvino`
package's CPU device, not an ORT execution provider), a synchronous `infer()` of one infer request whose input
tensor shares the host array, set once, the model compiled with the LATENCY hint at FP32 inference precision; a
torch model runs eagerly on `torch_device`, its input moved there once, and on CUDA each call ends with a device
synchronize (kernels are asynchronous).
"""

from .runner import BenchOptions, benchmark

__all__ = ["BenchOptions", "benchmark"]
