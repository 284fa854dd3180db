"""`prune_model`: structured channel pruning of a RepVGG with Torch-Pruning (TP), to a MAC or latency target or a
channel ratio.

How a prune runs:

1. The model's prunable channel groups ("slots": a plain layer, or a multi-branch stage whose identity adds tie its
   blocks together) and the widths each may take (`slots`).
2. The widths are planned against a cost (`cost`): MACs for `keep_macs`, milliseconds from a latency table
   measured on this machine's runtime (`latency`) for `keep_latency` / `target_ms`.
   - Planner `budget` (global scope): the widths whose summed value is largest within the budget, each layer's cost
     depending on its width and its input's (`budget`); a slot's value at a width comes from the criterion
     (`importance.slot_values`: for taylor and sensitivity, minus the loss it costs).
   - Planner `ranking`, local scope, isomorphic ranking and a multi-branch model's MACs: the pruning ratio is
     bisected until the planned architecture keeps the target fraction of the cost within ±2% (`plan`), uniform
     per slot or by TP's global ranking.
   - A latency plan is then timed whole against the unpruned model and planned again with a corrected budget until
     it measures on target (`_verify`).
   - `channel_ratio`: one ratio, no search.
3. TP prunes the real model to the planned widths, its importance picking the channels (`realize`), and a plain
   model's pruned layers are re-fitted to the unpruned model's outputs when asked (`reconstruct`).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterable, Sequence

import torch
import torch_pruning as tp
from torch import nn

from repvgg import PlainRepVGG, RepVGG, channel_groups

from .budget import select_within_budget
from .cost import ChainMacCost, LatencyCost, MacCost
from .errors import PruneError
from .importance import accumulate_gradients, first_images, gradient_batches, make_importance, slot_values
from .latency import load_or_build_table
from .latency_table import LatencyTable
from .measure import measure_ratios
from .options import PruneOptions, default_round_to
from .plan import Planner, search_ratio
from .realize import realize
from .reconstruct import reconstruct
from .slots import Slot, layer_widths, slot_widths, slots_of

VERIFY_TOLERANCE = 0.02  # |measured / unpruned - target| a latency plan may miss by before it is planned again


def _check_mode(model: nn.Module, options: PruneOptions) -> None:
    want = PlainRepVGG if options.mode == "plain" else RepVGG
    if not isinstance(model, want):
        raise PruneError(f"prune.mode={options.mode} needs a {want.__name__}, got a {type(model).__name__}")
    if options.reconstruct and options.mode != "plain":
        raise PruneError("prune.reconstruct: re-fits plain layers; prune.mode=multibranch has none (set it false)")


def _plan(model, options: PruneOptions, example_input, importance, slots, seed: int, round_to: int, macs: MacCost,
          latency_table: LatencyTable | None, batches: list, measure: Callable[..., dict],
          ) -> tuple[tuple[int, ...], float | None, dict]:
    """The planned slot widths, the pruning ratio they come from (None for the budget search) and what the report
    records about the plan (its planner; the budget search's value; a latency target's prediction, table and the
    measured check of each plan)."""
    target = options.target

    def planner() -> Planner:
        return Planner(model, example_input, importance, slots, options, seed)

    if target.kind == "channel_ratio":
        plan = planner()
        return plan(min(target.value, plan.max_ratio)), target.value, {"planner": "ratio"}
    if target.latency:
        if latency_table is None:
            latency_table = load_or_build_table(model, options.latency, example_input.shape[-1], round_to)
        cost = LatencyCost(latency_table, model)
    else:
        cost = macs
    before = cost.cost([s.init for s in slots])
    budget = target.value if target.kind == "target_ms" else target.value * before
    budgeted = (options.planner == "budget" and options.scope == "global" and not options.isomorphic
                and (target.latency or isinstance(model, PlainRepVGG)))  # multi-branch MACs are no chain
    report = {"planner": "budget" if budgeted else "ranking"}
    if budgeted:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # random importance: a draw of its own, the global generator left as it was
            values, report["values"] = slot_values(model, example_input, importance, slots, options, batches)
        chain = cost if target.latency else ChainMacCost(model, example_input)

        def plan_within(limit: float) -> tuple[tuple[int, ...], float | None]:
            return select_within_budget([s.choices() for s in slots], values, chain, limit, target.name), None
    else:
        def plan_within(limit: float) -> tuple[tuple[int, ...], float | None]:
            return search_ratio(planner(), cost, limit / before, target.name, options, round_to)

    widths, ratio = plan_within(budget)
    if target.latency:
        report["latency"] = {"before_ms": before, "budget_ms": budget, "table": latency_table.summary()}
        if options.latency.verify:
            widths, ratio, report["latency"]["rounds"] = _verify(model, options, example_input.shape[-1], budget,
                                                                 (widths, ratio), plan_within, measure)
            for r in report["latency"]["rounds"]:  # each round's plan as the table predicts it, beside its measurement
                r["predicted_ms"] = cost.cost(tuple(r["widths"]))
        report["latency"]["predicted_ms"] = cost.cost(widths)
    if budgeted:
        report["values"]["plan"] = sum(v[s.choices().index(w)] for v, s, w in zip(values, slots, widths))
    return widths, ratio, report


def _verify(model, options: PruneOptions, image_size: int, budget: float, first: tuple, plan_within: Callable,
            measure: Callable[..., dict]) -> tuple[tuple[int, ...], float | None, list[dict]]:
    """Close the latency loop: time the plan against the unpruned model (`measure.measure_ratios`, as the bench
    compares them, until two blocks of rounds agree within VERIFY_TOLERANCE) and, while the measured ratio misses
    the target's by more than VERIFY_TOLERANCE, scale the budget by the miss (the table's error at this plan, taken
    as proportional) and plan again, up to `options.latency.verify` times. Returns the plan that measured closest
    to the target, not above it by more than the tolerance where one does, and every round's figures."""
    target, plan, rounds = options.target, first, []
    for attempt in range(options.latency.verify + 1):
        measured = measure(model, [plan[0]], options.latency, image_size, log=_stderr, agree=VERIFY_TOLERANCE)
        goal = target.value if target.kind == "keep_latency" else target.value / measured["unpruned_ms"]
        got = measured["candidates"][0]["ratio"]
        rounds.append({"budget_ms": budget, "widths": list(plan[0]), "ratio": plan[1], "measured_ratio": got,
                       "target_ratio": goal, "unpruned_ms": measured["unpruned_ms"],
                       "blocks": [b[0] for b in measured["blocks"]], "agreed": measured["agreed"]})
        if abs(got - goal) <= VERIFY_TOLERANCE or attempt == options.latency.verify:
            break
        budget *= goal / got
        try:
            plan = plan_within(budget)
        except PruneError as e:  # the corrected budget is below what the floors allow: keep what was measured
            rounds[-1]["stopped"] = str(e)
            break
    within = [r for r in rounds if r["measured_ratio"] <= r["target_ratio"] + VERIFY_TOLERANCE] or rounds
    best = min(within, key=lambda r: abs(r["measured_ratio"] - r["target_ratio"]))
    best["chosen"] = True
    return tuple(best["widths"]), best["ratio"], rounds


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def size_before(model: nn.Module, example_input: torch.Tensor) -> dict:
    """What a prune's report records of the model before pruning: its MACs and parameters as Torch-Pruning counts
    them, its layer widths and its channel groups."""
    macs, params = tp.utils.count_ops_and_params(model, example_input)
    return {"macs_before": macs, "params_before": params, "widths_before": layer_widths(model),
            "groups": len(channel_groups(model, example_input))}


def size_after(model: nn.Module, example_input: torch.Tensor, before: dict, slots: list[Slot],
               widths: Sequence[int]) -> dict:
    """`before` (`size_before`) with the pruned model's MACs, parameters and layer widths, the fraction of the MACs
    kept and the fraction of the prunable slots' channels removed (`widths`: the slots' widths after pruning)."""
    macs, params = tp.utils.count_ops_and_params(model, example_input)
    prunable = [i for i, s in enumerate(slots) if s.prunable] or range(len(slots))
    return {**before, "macs_after": macs, "params_after": params, "widths_after": layer_widths(model),
            "keep_macs_achieved": macs / before["macs_before"],
            "channels_removed": 1 - sum(widths[i] for i in prunable) / sum(slots[i].init for i in prunable)}


def prune_model(
    model: nn.Module,
    options: PruneOptions,
    example_input: torch.Tensor,
    batches: Iterable | None = None,
    between_steps: Callable[[nn.Module, int], None] | None = None,
    latency_table: LatencyTable | None = None,
    measure: Callable[..., dict] = measure_ratios,
) -> dict:
    """Prune `model` in place (a PlainRepVGG for mode=plain, a training-time RepVGG for mode=multibranch).

    `batches` ((x, y) pairs) feed taylor / hessian importance: `options.gradient_batches` of them. With
    `options.steps` > 1 the channels go over TP's iterative steps and `between_steps(model, i)` runs after step i
    (0-based) of every step but the last (the fine-tune stage follows the last); it must leave the
    architecture as it found it (fold any BN it inserted). A latency target uses `latency_table`, or reads or
    builds the one `options.latency` asks for (`load_or_build_table`) when none is given; `measure` times a latency
    plan against the unpruned model (`measure.measure_ratios`; under DDP, rank 0's timing shared with the others).
    Reconstruction (`options.reconstruct`) re-fits the pruned plain layers on `batches`' images. Returns the report
    (MACs, params, widths, the plan, and for a latency target its predicted latency, budget, table and checks)."""
    _check_mode(model, options)
    data = gradient_batches(options, batches)
    round_to = options.round_to or default_round_to(example_input.device.type)
    was_training = model.training
    model.eval()
    try:
        before = size_before(model, example_input)
        importance = make_importance(options.importance)
        slots = slots_of(model, options, round_to)
        macs = MacCost(model, example_input)
        if data:
            accumulate_gradients(model, importance, data, example_input.device)
        seed = int(torch.randint(2**31 - 1, ()))
        widths, ratio, plan = _plan(model, options, example_input, importance, slots, seed, round_to, macs,
                                    latency_table, batches, measure)
        reference = copy.deepcopy(model) if options.reconstruct else None
        kept = realize(model, options, example_input, importance, slots, widths, data, seed, between_steps,
                       was_training)
        if reference is not None:
            images = first_images(batches or [], options.reconstruct_images)
            refit = reconstruct(model, reference, kept, images, ridge=options.reconstruct_ridge)
        report = size_after(model, example_input, before, slots, widths)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if slot_widths(slots) != widths or report["macs_after"] != macs.cost(widths):  # e.g. a BN left inserted
        raise RuntimeError(
            f"pruning did not realize its plan: widths {slot_widths(slots)} for {widths}, "
            f"{report['macs_after']:.0f} MACs for {macs.cost(widths):.0f}"
        )
    report.update(channel_ratio=ratio, round_to=round_to, **plan)
    if options.reconstruct:
        report["reconstruct"] = refit
    return report
