"""What a prune is asked for, as the prune package's own typed options: the target (`Target`), how the latency table
a latency target reads is measured (`LatencyOptions`), and the rest of the search (`PruneOptions`). The recipe's
`prune` section is translated into these by the prune stage; the names in messages are the recipe's keys, which is
where a user sets them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from compress.timing import LATENCY_TABLE

from .errors import PruneError

TARGET_KINDS = ("keep_macs", "channel_ratio", "keep_latency", "target_ms")
LATENCY_KINDS = ("keep_latency", "target_ms")  # the targets a latency table serves
_FRACTIONS = ("keep_macs", "channel_ratio", "keep_latency")  # target_ms is milliseconds, any positive number


@dataclass(frozen=True)
class Target:
    """What a prune aims at: `kind` (one of TARGET_KINDS) and its `value`, a fraction in (0, 1) except for
    target_ms (a latency budget in milliseconds)."""

    kind: str
    value: float

    def __post_init__(self):
        if self.kind not in TARGET_KINDS:
            raise PruneError(f"prune: unknown target '{self.kind}'; give one of {', '.join(TARGET_KINDS)}")
        object.__setattr__(self, "value", float(self.value))  # "prune.target_ms=5.0", as the recipe's float says it
        if self.kind in _FRACTIONS and not 0 < self.value < 1:
            raise PruneError(f"prune.{self.kind}: {self.value} is not in (0, 1)")
        if not self.value > 0:
            raise PruneError(f"prune.{self.kind}: {self.value} is not above 0")

    @property
    def latency(self) -> bool:
        """Whether this is a latency target, which a latency table serves: the one place that decides it."""
        return self.kind in LATENCY_KINDS

    @property
    def name(self) -> str:
        """The target as messages name it, e.g. "prune.keep_macs=0.5"."""
        return f"prune.{self.kind}={self.value}"


@dataclass(frozen=True)
class LatencyOptions:
    """How a latency table is measured: on `provider` (a runtime of `compress.runtime.RUNTIMES` that runs ONNX files:
    ONNX Runtime's CPU provider, OpenVINO's CPU device) with `threads` (None: all cores), `batch` and `precision`,
    `grid_points` widths per axis of each layer's grid, every model timed over `rounds` rounds; cached under
    `cache_dir` (None: the user's cache directory), the first layer's graphs rewritten as `stem` says (the export's
    `export.stem` or `export.stem_fp32` for this precision). A plan made from it is timed whole against the
    unpruned model and re-planned up to `verify` times until it measures within tolerance of the target
    (`pruning._verify`)."""

    provider: str = "cpu"
    threads: int | None = None
    batch: int = 8
    precision: Literal["fp32", "int8"] = "fp32"
    grid_points: int = 8
    rounds: int = LATENCY_TABLE.rounds
    cache_dir: Path | None = None
    verify: int = 3  # plans timed against the unpruned model and corrected at most this often (0: trust the table)
    stem: str = "none"  # the rewrite of the first layer (compress.stem.STEM_REWRITES) its graphs are timed through

    def cache_key(self) -> dict:
        """The settings a table's numbers depend on, for its cache key: all but where the cache lies."""
        values = asdict(self)
        del values["cache_dir"], values["verify"]  # the table does not depend on how its plans are checked
        if values["stem"] == "none":  # as every table timed before the setting existed: their keys stay valid
            del values["stem"]
        return values


@dataclass(frozen=True)
class PruneOptions:
    """A prune: its target, `mode` ("plain" prunes a PlainRepVGG per layer, "multibranch" a training-time RepVGG
    per stage), the `importance` criterion (a name in `importance.IMPORTANCES`), local or global `scope`, at most
    `max_layer_ratio` of a layer removed and no layer below `min_width` channels (None: `round_to`), TP's
    `isomorphic` ranking, widths in multiples of `round_to` (None: `default_round_to` of the example input's
    device), over `steps` iterative steps, the first layer pruned only if `prune_first_layer`, taylor / hessian
    reading `gradient_batches` batches, and a latency target's table measured as `latency` says.

    `planner`: "budget" chooses the widths that keep the most importance within the target's cost (MACs of a
    plain model, or a latency table's milliseconds; `budget.select_within_budget`), under global scope;
    "ranking" bisects the ratio of Torch-Pruning's global ranking until the cost fits (`plan.search_ratio`), as
    local scope, isomorphic ranking and multi-branch MAC targets always do. The `sensitivity` criterion measures
    its loss curves on `sensitivity_images` images at `sensitivity_grid` widths per slot, cached in the file
    `sensitivity_cache` (None: not cached) under the model's weights and these settings. `reconstruct` re-fits
    a pruned plain model's layers to the unpruned one's outputs on `reconstruct_images` images, by least squares
    with ridge `reconstruct_ridge` (`reconstruct`)."""

    target: Target = Target("keep_macs", 0.5)
    mode: Literal["plain", "multibranch"] = "plain"
    importance: str = "l2"
    scope: Literal["local", "global"] = "global"
    max_layer_ratio: float = 0.8
    min_width: int | None = None
    isomorphic: bool = False
    round_to: int | None = None
    steps: int = 1
    prune_first_layer: bool = False
    gradient_batches: int = 4
    latency: LatencyOptions = LatencyOptions()
    planner: Literal["budget", "ranking"] = "budget"
    sensitivity_images: int = 2048
    sensitivity_grid: int = 8
    sensitivity_cache: Path | None = None
    reconstruct: bool = False
    reconstruct_images: int = 512
    reconstruct_ridge: float = 1e-3


def default_round_to(device_type: str) -> int:
    """Channel multiple the kernels block by: 16 on CPUs (oneDNN / MLAS), 8 on CUDA (tensor cores)."""
    return 8 if device_type == "cuda" else 16
