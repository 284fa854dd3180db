"""`prune_model`: structured channel pruning of a RepVGG with Torch-Pruning (TP), to a MAC or latency target or a
channel ratio.

How a prune runs:

1. The model's prunable channel groups ("slots": a plain layer, or a multi-branch stage whose identity adds tie its
   blocks together) and the widths each may take (`slots`).
2. The widths are planned against a cost (`cost`): MACs for `keep_macs`, milliseconds from a latency table
   measured on this machine's runtime (`latency`) for `keep_latency` / `target_ms`.
   - `keep_macs` (and a latency target under `scope: local` or `isomorphic`): the pruning ratio is bisected until
     the planned architecture keeps the target fraction of the cost within ±2% (`plan`), uniform per slot or by
     TP's global ranking.
   - `keep_latency` / `target_ms` (global scope): the widths that keep the most importance within the budget,
     each layer's latency depending on its width and its input's (`budget`).
   - `channel_ratio`: one ratio, no search.
3. TP prunes the real model to the planned widths, its importance picking the channels (`realize`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch_pruning as tp
from torch import nn

from repvgg import PlainRepVGG, RepVGG, channel_groups

from .budget import select_within_budget
from .cost import LatencyCost, MacCost
from .errors import PruneError
from .importance import accumulate_gradients, gradient_batches, kept_importance, make_importance
from .latency import load_or_build_table
from .latency_table import LatencyTable
from .options import PruneOptions, default_round_to
from .plan import Planner, search_ratio
from .realize import realize
from .slots import layer_widths, slot_widths, slots_of


def _check_mode(model: nn.Module, options: PruneOptions) -> None:
    want = PlainRepVGG if options.mode == "plain" else RepVGG
    if not isinstance(model, want):
        raise PruneError(f"prune.mode={options.mode} needs a {want.__name__}, got a {type(model).__name__}")


def _plan(model, options: PruneOptions, example_input, importance, slots, seed: int, round_to: int, macs: MacCost,
          latency_table: LatencyTable | None) -> tuple[tuple[int, ...], float | None, dict | None]:
    """The planned slot widths, the pruning ratio they come from (None for the budget search) and, for a latency
    target, what the report records about it."""
    target = options.target

    def planner() -> Planner:
        return Planner(model, example_input, importance, slots, options, seed)

    if target.kind == "keep_macs":
        return (*search_ratio(planner(), macs, target.value, target.name, options, round_to), None)
    if target.kind == "channel_ratio":
        plan = planner()
        return plan(min(target.value, plan.max_ratio)), target.value, None
    if latency_table is None:
        latency_table = load_or_build_table(model, options.latency, example_input.shape[-1], round_to)
    cost = LatencyCost(latency_table, model)
    before = cost.cost([s.init for s in slots])
    budget = target.value if target.kind == "target_ms" else target.value * before
    ratio = None
    if options.scope == "global" and not options.isomorphic:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # random importance: a draw of its own, the global generator left as it was
            kept = kept_importance(model, example_input, importance, slots)
        widths = select_within_budget([s.choices() for s in slots], kept, cost, budget, target.name)
    else:
        widths, ratio = search_ratio(planner(), cost, budget / before, target.name, options, round_to)
    report = {"before_ms": before, "predicted_ms": cost.cost(widths), "budget_ms": budget, "table": latency_table.summary()}
    return widths, ratio, report


def prune_model(
    model: nn.Module,
    options: PruneOptions,
    example_input: torch.Tensor,
    batches: Iterable | None = None,
    between_steps: Callable[[nn.Module, int], None] | None = None,
    latency_table: LatencyTable | None = None,
) -> dict:
    """Prune `model` in place (a PlainRepVGG for mode=plain, a training-time RepVGG for mode=multibranch).

    `batches` ((x, y) pairs) feed taylor / hessian importance: `options.gradient_batches` of them. With
    `options.steps` > 1 the channels go over TP's iterative steps and `between_steps(model, i)` runs after step i
    (0-based) of every step but the last (the fine-tune stage follows the last); it must leave the
    architecture as it found it (fold any BN it inserted). A latency target uses `latency_table`, or reads or
    builds the one `options.latency` asks for (`load_or_build_table`) when none is given. Returns the report (MACs,
    params, widths, and for a latency target its predicted latency, budget and table)."""
    _check_mode(model, options)
    data = gradient_batches(options, batches)
    round_to = options.round_to or default_round_to(example_input.device.type)
    was_training = model.training
    model.eval()
    try:
        macs_before, params_before = tp.utils.count_ops_and_params(model, example_input)
        widths_before = layer_widths(model)
        n_groups = len(channel_groups(model, example_input))
        importance = make_importance(options.importance)
        slots = slots_of(model, options, round_to)
        macs = MacCost(model, example_input)
        if data:
            accumulate_gradients(model, importance, data, example_input.device)
        seed = int(torch.randint(2**31 - 1, ()))
        widths, ratio, latency = _plan(model, options, example_input, importance, slots, seed, round_to, macs,
                                       latency_table)
        realize(model, options, example_input, importance, slots, widths, data, seed, between_steps, was_training)
        macs_after, params_after = tp.utils.count_ops_and_params(model, example_input)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if slot_widths(slots) != widths or macs_after != macs.cost(widths):  # e.g. between_steps left a BN inserted
        raise RuntimeError(
            f"pruning did not realize its plan: widths {slot_widths(slots)} for {widths}, "
            f"{macs_after:.0f} MACs for {macs.cost(widths):.0f}"
        )
    prunable = [i for i, s in enumerate(slots) if s.prunable] or range(len(slots))
    report = {
        "macs_before": macs_before,
        "macs_after": macs_after,
        "params_before": params_before,
        "params_after": params_after,
        "widths_before": widths_before,
        "widths_after": layer_widths(model),
        "groups": n_groups,
        "keep_macs_achieved": macs_after / macs_before,
        "channel_ratio": ratio,
        "channels_removed": 1 - sum(widths[i] for i in prunable) / sum(slots[i].init for i in prunable),
        "round_to": round_to,
    }
    if latency is not None:
        report["latency"] = latency
    return report
