"""Planning by pruning ratio: the slot widths a ratio gives (uniform for local scope, Torch-Pruning's global or
isomorphic ranking otherwise), and the bisection of the ratio that brings a cost (MACs, or latency) to a fraction
of the unpruned model's within ±TOLERANCE.

Widths are floored to multiples of `round_to` (and of the conv groups), never below a slot's `min_width`, as TP's
own `round_to` does for ungrouped layers. When rounding makes the cost jump over the window, single slots are
rounded the other way one unit at a time, those whose unrounded width lies nearest that way first
(largest-remainder rounding), until the cost is inside.

In a single step TP 1.6 ignores `max_pruning_ratio` (only checked before a step), so a global ranking can strip a
layer; a layer it would empty is skipped altogether. `_Protect` keeps each slot's `min_width` share out of reach.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from .cost import CostModel
from .errors import PruneError
from .options import PruneOptions
from .slots import Slot, ignored_layers

TOLERANCE = 0.02  # |cost_after / cost_before - target| allowed
_PROTECTED = 1e6  # added to the importance of channels a slot must keep: ranked after every other channel


class _Protect:
    """Wraps a TP importance: the `min_width` most important channels of each slot rank after all others, so
    the global ranking cannot push a slot past `max_layer_ratio` nor empty it (TP would then skip it)."""

    def __init__(self, base, slot_of: dict[nn.Module, Slot]):
        self.base, self.slot_of = base, slot_of

    def __call__(self, group):
        imp = self.base(group)
        slot = self.slot_of.get(group[0].dep.target.module)
        if imp is None or slot is None or imp.numel() % slot.groups:
            return imp
        per_group = imp.view(slot.groups, -1).mean(0)  # TP ranks the mean over conv groups
        keep = min(slot.min_width // slot.groups, per_group.numel())
        boost = torch.zeros_like(per_group)
        boost[per_group.topk(keep).indices] = _PROTECTED
        return imp + boost.repeat(slot.groups)


class Planner:
    """Slot widths for a pruning ratio: uniform for local scope, TP's (global / isomorphic) ranking otherwise."""

    def __init__(self, model, example_input, importance, slots: list[Slot], options: PruneOptions, seed: int):
        self.slots, self.seed = slots, seed
        self.pruner = None
        prunable = [s for s in slots if s.prunable]
        if options.scope == "global" or options.isomorphic:
            slot_of = {c: s for s in prunable for c in s.convs}
            frozen = [c for s in slots if not s.prunable for c in s.convs]
            self.pruner = tp.pruner.BasePruner(
                model,
                example_input,
                importance=_Protect(importance, slot_of),
                global_pruning=options.scope == "global",
                pruning_ratio=0.0,
                max_pruning_ratio=options.max_layer_ratio,
                ignored_layers=ignored_layers(model, options) + frozen,
                round_to=None,
                isomorphic=options.isomorphic,
            )
            # beyond this global ratio the ranking would reach protected channels
            total = sum(s.init // s.groups for s in prunable)
            kept = sum(s.min_width // s.groups for s in prunable)
            self.max_ratio = 1.0 - (kept + 0.5) / total if total else 0.0
        else:
            self.max_ratio = options.max_layer_ratio

    def raw(self, ratio: float) -> list[int]:
        """Widths before rounding: what the ranking (or the uniform ratio) leaves of each slot."""
        if self.pruner is None:
            return [s.groups * int(s.init // s.groups * (1 - ratio)) for s in self.slots]
        slot_of = {c: i for i, s in enumerate(self.slots) for c in s.convs}
        widths = [s.init for s in self.slots]
        self.pruner.reset()
        self.pruner.per_step_pruning_ratio = tp.pruner.algorithms.scheduler.linear_scheduler(ratio, 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # random importance: the same draw for every ratio
            for group in self.pruner.step(interactive=True):
                dep, idxs = group[0]
                i = slot_of[dep.target.module]
                widths[i] = self.slots[i].init - len(idxs)
        return widths

    def __call__(self, ratio: float) -> tuple[int, ...]:
        return tuple(s.legal(w) for s, w in zip(self.slots, self.raw(ratio)))


def search_ratio(plan: Planner, cost: CostModel, target: float, target_name: str, options: PruneOptions,
                 round_to: int) -> tuple[tuple[int, ...], float]:
    """Slot widths whose cost is `target` of the unpruned model's within TOLERANCE, and the pruning ratio they
    come from. `target_name` (e.g. "prune.keep_macs=0.5") names the target in the error when none is reachable."""
    before = cost.cost(tuple(s.init for s in plan.slots))

    def keep(widths: tuple[int, ...]) -> float:
        return cost.cost(widths) / before

    def error(widths: tuple[int, ...]) -> float:
        return abs(keep(widths) - target)

    lo, hi = 0.0, plan.max_ratio
    above, below = plan(lo), plan(hi)
    if keep(below) > target:  # even the most pruning the ratio allows keeps too much
        lo, above, below = hi, below, None
    # no plan changes within half a channel of the ratio: TP counts whole channels per conv group
    resolution = 0.5 / max(1, sum(s.init // s.groups for s in plan.slots if s.prunable))
    while below is not None and hi - lo > resolution and min(error(above), error(below)) > TOLERANCE / 4:
        mid = (lo + hi) / 2
        w = plan(mid)
        if keep(w) > target:
            lo, above = mid, w
        else:
            hi, below = mid, w
    found = [(above, lo)] + ([(below, hi)] if below is not None else [])
    if min(error(w) for w, _ in found) > TOLERANCE / 2:
        # rounding jumps over the window: round single slots the other way, closest to the ranking first
        for ratio, direction in ((hi, 1), (lo, -1)) if below is not None else ((lo, -1),):
            start = plan(ratio)
            refined = _round_into_window(start, plan.raw(ratio), direction, plan.slots, keep, target)
            if refined is not None:
                found.append((refined, ratio))
                break
    best, ratio = min(found, key=lambda f: error(f[0]))
    if error(best) > TOLERANCE:
        raise PruneError(
            f"{target_name} is not reachable within ±{TOLERANCE:.0%}: closest is {keep(best):.3f} "
            f"(round_to={round_to}, max_layer_ratio={options.max_layer_ratio}); change one of those or {target_name.split('=')[0]}"
        )
    return best, ratio


def _round_into_window(start, raw, direction, slots, keep, target):
    """From `start` (below the target for direction +1, above for -1) move single slots one unit at a time,
    those whose unrounded width `raw` is furthest the moving way first (largest-remainder rounding), skipping
    moves that jump past the window, until the cost is within TOLERANCE / 2 of the target."""
    widths = list(start)
    for _ in range(sum(s.init // s.unit + 1 for s in slots)):
        if abs(keep(tuple(widths)) - target) <= TOLERANCE / 2:
            return tuple(widths)
        order = sorted(range(len(slots)), key=lambda i: -(raw[i] - widths[i]) * direction / slots[i].unit)
        for i in order:
            nxt = slots[i].step(widths[i], direction)
            if nxt is None:
                continue
            cand = tuple(widths[:i] + [nxt] + widths[i + 1 :])
            if (keep(cand) - target) * direction <= TOLERANCE / 2:  # not past the window
                widths = list(cand)
                break
        else:
            return None
    return None
