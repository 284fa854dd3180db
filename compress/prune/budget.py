"""Selection within a budget: the slot widths that keep the most importance while the cost stays within a budget.

The cost is a chain (`ChainCost`): a layer's cost depends on its own width and on its input's, the previous slot's
width, so one slot's width changes its neighbours' costs too. A dynamic programme over the chain keeps, for each width
of slot i, the Pareto front of (cost, importance) over the choices for slots 0..i. Points that cannot finish within
the budget, even with the cheapest widths after them, are dropped; a front longer than `max_front` points is thinned
to that many, spread over its cost range, so the search is exact while fronts stay below that size (small models)
and close to it otherwise. The best final point within the budget is read back along its chain.

Importance grows with width, so a wider width at the same cost dominates a narrower one: widths on a latency
plateau come out at their widest (and equal importance at equal cost goes to the most channels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cost import ChainCost
from .errors import PruneError


@dataclass
class _Front:
    """Non-dominated partial plans ending at one width of one slot, with where each came from."""

    cost: np.ndarray
    value: np.ndarray
    channels: np.ndarray
    came_from: np.ndarray  # (index of the previous slot's width, index of the point in its front), or (-1, -1)


def _pareto(cost, value, channels, came_from, max_front: int) -> _Front:
    """The points no other beats on both cost and (importance, then channels), thinned to `max_front` spread over
    the cost range. Channels break ties of importance, so that a plan whose extra channels are worth nothing to the
    criterion (a flat curve, scores of zero) still spends the budget on them rather than stopping short of it."""
    if not len(cost):
        return _Front(cost, value, channels, came_from)
    order = np.lexsort((-channels, -value, cost))  # by cost, then most importance, then most channels
    # (importance, channels) as one exact integer: importance's dense rank, then the channel count
    rank = np.unique(value, return_inverse=True)[1].astype(np.int64)
    score = (rank * (int(channels.max()) + 1) + channels)[order]
    best_before = np.maximum.accumulate(np.concatenate([[-1], score[:-1]]))
    keep = order[score > best_before]
    if len(keep) > max_front:
        keep = keep[np.unique(np.linspace(0, len(keep) - 1, max_front).round().astype(int))]
    return _Front(cost[keep], value[keep], channels[keep], came_from[keep])


def select_within_budget(
    choices: list[list[int]],
    kept: list[list[float]],
    cost: ChainCost,
    budget: float,
    target_name: str,
    max_front: int = 2048,
) -> tuple[int, ...]:
    """The slot widths, one of `choices[i]` each (ascending), that keep the most importance (`kept[i][k]` for
    width `choices[i][k]`, non-decreasing in k) with `cost.cost(widths) <= budget`. `target_name` names the
    target in the one-line error when even the cheapest widths cost more than the budget."""
    n = len(choices)
    memo: dict[tuple[int, int | None, int], float] = {}

    def step(i: int, width_in: int | None, width: int) -> float:
        if (i, width_in, width) not in memo:
            memo[(i, width_in, width)] = cost.slot_cost(i, width_in, width)
        return memo[(i, width_in, width)]

    widest = [c[-1] for c in choices]
    constant = cost.cost(widest) - sum(step(i, widest[i - 1] if i else None, widest[i]) for i in range(n))
    limit = budget - constant
    slack = 1e-9 * max(abs(limit), 1.0)  # float sums in another order must not turn a fit into a miss
    # the least the slots after slot i can cost, for each width of slot i
    rest = [np.zeros(len(choices[-1]))]
    for i in range(n - 1, 0, -1):
        rest.insert(0, np.array([min(step(i, p, w) + r for w, r in zip(choices[i], rest[0])) for p in choices[i - 1]]))
    cheapest = min(step(0, None, w) + r for w, r in zip(choices[0], rest[0])) + constant
    if cheapest > budget + slack:
        raise PruneError(
            f"{target_name} is not reachable: the narrowest widths allowed cost {cheapest:.4g} {cost.unit}, "
            f"over the budget of {budget:.4g} {cost.unit} (round_to, max_layer_ratio and min_width set how narrow)"
        )

    fronts: list[list[_Front]] = []
    for i in range(n):
        row = []
        for k, w in enumerate(choices[i]):
            if i == 0:
                parts = [(np.array([step(0, None, w)]), np.zeros(1), np.zeros(1, dtype=np.int64), np.full((1, 2), -1))]
            else:
                parts = [(f.cost + step(i, p, w), f.value, f.channels,
                          np.stack([np.full(len(f.cost), pk), np.arange(len(f.cost))], 1))
                         for pk, (p, f) in enumerate(zip(choices[i - 1], fronts[i - 1]))]
            c, v, ch, came_from = (np.concatenate(x) for x in zip(*parts))
            fits = c + rest[i][k] <= limit + slack
            row.append(_pareto(c[fits], v[fits] + kept[i][k], ch[fits] + w, came_from[fits], max_front))
        fronts.append(row)

    # the final point: most importance within the budget, then most channels
    _, _, k, j = max((float(f.value[j]), int(f.channels[j]), k, j)
                     for k, f in enumerate(fronts[-1]) for j in range(len(f.cost)))
    widths = []
    for i in range(n - 1, -1, -1):
        widths.insert(0, choices[i][k])
        k, j = (int(x) for x in fronts[i][k].came_from[j])
    return tuple(widths)
