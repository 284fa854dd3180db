"""The study's strategies, one record each: how a strategy's points differ from the recipe. Adding a strategy is
one entry in `STRATEGIES` (the recipe's `study.strategies` accepts exactly these names).

Every pruning strategy prunes the shared base to `keep` of its cost; `target` says which cost (`prune.keep_macs`
or `prune.keep_latency`), `prune` sets other prune keys, `structure` how a pruned plain model fine-tunes (None: the
recipe's, except that only a strategy that asks for `rebranch` gets it). A `from_scratch` strategy prunes nothing:
it trains a model of the same cost from random init, and its curve does not end at the unpruned model. A
`prune_trains` strategy (ResRep) spends the fine-tune's images in its prune stage: its points train as long as the
others' fine-tunes.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Strategy:
    """One study strategy."""

    description: str
    colour: str  # its curve's colour in pareto.png
    target: str = "keep_macs"  # the prune target `keep` sets
    prune: dict = field(default_factory=dict)  # other prune-section values
    structure: str | None = None  # finetune.structure of its points (None: the recipe's, rebranch -> bn)
    from_scratch: bool = False
    prune_trains: bool = False  # its prune stage trains on the fine-tune's budget (ResRep), and no fine-tune follows


# plain-latency points: fractions of the FP32 latency at batch 8, so they sit at latencies comparable to the others'.
# Not INT8: at 32x32 an INT8 file's time is nearly flat below half the MACs, and plans to fractions of it starve
# stage 3 for no time saved (docs/study.md, "Strategies")
LATENCY_POINTS = {"precision": "fp32", "batch": 8}

STRATEGIES: dict[str, Strategy] = {
    "plain": Strategy("re-parameterize, then prune each layer: the widths that keep the most value (the recipe's "
                      "criterion: the loss it costs, by default) within the MAC budget, re-fitted to the unpruned "
                      "model's outputs", "#1f77b4"),
    "plain-ranking": Strategy("plain as Torch-Pruning prunes it: L2 magnitudes normalised per layer, one global "
                              "ranking bisected to the MAC target, no re-fit (this toolkit's default before "
                              "pruning in loss units)", "#8c564b",
                              prune={"importance": "l2", "planner": "ranking", "reconstruct": False}),
    "plain-norefit": Strategy("plain without the re-fit (prune.reconstruct off): beside multibranch, what the "
                              "identity branches' coupling costs with the same criterion and fine-tune", "#7f7f7f",
                              prune={"reconstruct": False}),
    "resrep": Strategy("ResRep on the plain model: compactors trained for the fine-tune's budget while the masked "
                       "rows fade to zero under a group lasso, then cut and merged (no fine-tune after)", "#e377c2",
                       prune={"method": "resrep", "reconstruct": False}, prune_trains=True),
    "plain-uniform": Strategy("the same, one ratio for every layer", "#2ca02c", prune={"scope": "local"}),
    "plain-latency": Strategy("plain, to the same fraction of the plain model's measured FP32 latency (batch 8) "
                              "instead of its MACs", "#ff7f0e", target="keep_latency",
                              prune={"latency": LATENCY_POINTS}),
    "plain-rebranch": Strategy("plain, fine-tuned as re-branched RepVGG blocks, folded back", "#17becf",
                               structure="rebranch"),
    "multibranch": Strategy("prune the coupled training-time model, then re-parameterize", "#d62728",
                            prune={"mode": "multibranch", "reconstruct": False}, structure="plain"),
    "scratch": Strategy("per-stage widths searched to the same MACs, trained from random init on at least as many "
                        "images as base + fine-tune, distilled from the same teacher", "#9467bd", from_scratch=True),
}
UNPRUNED_COLOUR = "#000000"


def strategy_keeps(study, strategy: str) -> list[float]:
    """The keep fractions of `strategy`'s points under a recipe's `study` section: `scratch_keep_macs` for a
    from-scratch strategy and `keep_latency` for a latency-targeted one where set, else `keep_macs`."""
    s = STRATEGIES[strategy]
    own = study.scratch_keep_macs if s.from_scratch else study.keep_latency if s.target == "keep_latency" else None
    return own or study.keep_macs
