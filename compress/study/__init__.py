"""The study: why multi-branch models resist pruning, as accuracy-latency curves of exported models.

One trained multi-branch model (DIR/base, or `study.base_dir`'s) is shared by every strategy (`strategies`); each
(strategy, keep) point is an ordinary pipeline run in DIR/points/<strategy>_<keep> (`points`), so a finished point
is reused on a rerun, and so is a finished point of `study.base_dir`'s study under the same settings. All points'
ONNX files are then benchmarked together, alternated in one session-at-a-time loop so that their latencies are
comparable, and compared pairwise at equal measured latency (`analysis`); `report` writes study.md, pareto.png
and TensorBoard. `run.Study` runs it all.
"""
