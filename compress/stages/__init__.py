"""The stage functions, one module per stage: each reads its input artifact through the `StageContext`, calls its
stage's algorithms with typed options made from its recipe sections, saves its output and returns the metrics
that go into `summary.json` (None on a DDP rank whose results rank 0 records). `RUNNERS` is the table the
pipeline dispatches through; the facts about each stage are in `compress.registry`."""

from collections.abc import Callable

from ..context import StageContext
from . import bench, export, finetune, prune, quantize, reparam, train

RUNNERS: dict[str, Callable[[StageContext], dict | None]] = {
    "train": train.run,
    "reparam": reparam.run,
    "prune": prune.run,
    "finetune": finetune.run,
    "quantize": quantize.run,
    "export": export.run,
    "bench": bench.run,
}
