"""What a prune spends and how it is spent: the MAC and latency cost models, and the budget search on a hand-made
latency function (checked against brute force)."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch_pruning as tp
from test_latency_table import SIZE, SPECS, tiny_plain

from compress.prune.budget import select_within_budget
from compress.prune.cost import ChainMacCost, LatencyCost, MacCost
from compress.prune.latency_table import LatencyTable, LayerShape
from compress.prune.slots import plain_specs
from repvgg import LayerSpec, PlainRepVGG, RepVGG


# ---- cost models --------------------------------------------------------------------------------------------------
def test_mac_cost_counts_what_torch_pruning_counts_on_the_built_model():
    model, example = tiny_plain(), torch.randn(1, 3, SIZE, SIZE)
    widths = (16, 24, 8, 40)
    specs = [LayerSpec(c, w, s.stride, s.groups) for s, c, w in zip(SPECS, (3, *widths[:-1]), widths)]
    built = PlainRepVGG(specs, 10)
    assert MacCost(model, example).cost(widths) == tp.utils.count_ops_and_params(built, example)[0]


def test_chain_mac_cost_is_torch_prunings_count_as_a_sum_over_slots():
    model, example = tiny_plain(), torch.randn(1, 3, SIZE, SIZE)
    cost = ChainMacCost(model, example)
    for widths in [(16, 24, 8, 40), (8, 8, 8, 8), (16, 32, 32, 64)]:
        chained = cost.constant + sum(cost.slot_cost(i, widths[i - 1] if i else None, w) for i, w in enumerate(widths))
        assert chained == cost.cost(widths) == MacCost(model, example).cost(widths)


def test_budget_search_on_macs_matches_brute_force():
    model, example = tiny_plain(), torch.randn(1, 3, SIZE, SIZE)
    cost = ChainMacCost(model, example)
    rng = np.random.default_rng(0)
    choices = [[8, 16], [8, 16, 24, 32], [8, 16, 24, 32], [8, 24, 40, 64]]
    kept = [np.cumsum(rng.uniform(0.1, 2.0, len(c))).tolist() for c in choices]
    budget = 0.5 * cost.cost([c[-1] for c in choices])
    widths = select_within_budget(choices, kept, cost, budget, "prune.keep_macs=0.5")
    assert cost.cost(widths) <= budget

    class Chained:  # the chain sum (equal to Torch-Pruning's count: the test above), fast enough for brute force
        def cost(self, w):
            return cost.constant + sum(cost.slot_cost(i, w[i - 1] if i else None, x) for i, x in enumerate(w))

    value = sum(v[c.index(w)] for v, c, w in zip(kept, choices, widths))
    assert value == pytest.approx(brute_force(choices, kept, Chained(), budget))


def synthetic_table() -> LatencyTable:
    """A table of hand-set grids: each plain layer of `tiny_plain` has its own shape and numbers."""
    rng = np.random.default_rng(0)
    shapes, size = [], SIZE
    axes = [[8, 16], [8, 16, 24, 32], [8, 16, 24, 32], [8, 16, 24, 32, 40, 48, 56, 64]]
    for spec, cin, cout in zip(SPECS, [[3], *axes[:-1]], axes):
        ms = np.cumsum(np.cumsum(rng.uniform(0.1, 1.0, (len(cin), len(cout))), 0), 1)
        shapes.append(LayerShape(size, spec.stride, spec.groups, cin == [3], cin, cout, ms.tolist(), ms.tolist()))
        size = (size - 1) // spec.stride + 1
    return LatencyTable({}, shapes, list(range(len(SPECS))), 3, scale=1.3, offset=0.25)


def bilinear(shape: LayerShape, cin: int, cout: int) -> float:
    return float(np.interp(cin, shape.cin, [np.interp(cout, shape.cout, row) for row in shape.ms]))


def test_latency_cost_is_the_calibrated_sum_of_interpolated_layers():
    table = synthetic_table()
    cost = LatencyCost(table, tiny_plain())
    widths = (16, 24, 8, 48)  # 24 and 48 lie on the grids; the image's 3 channels too
    io = list(zip((3, *widths[:-1]), widths))
    direct = 0.25 + 1.3 * sum(bilinear(s, a, b) for s, (a, b) in zip(table.shapes, io))
    assert cost.cost(widths) == pytest.approx(direct, rel=1e-12)
    assert table.predict_ms(io) == pytest.approx(direct, rel=1e-12)
    table.shapes[3].cout = [8, 32, 64]  # a coarser grid: 48 sits between 32 and 64
    table.shapes[3].ms = [[row[0], row[3], row[7]] for row in table.shapes[3].ms]
    halfway = (table.shapes[3].ms[0][1] + table.shapes[3].ms[0][2]) / 2  # cin 8, cout 48
    assert table.layer_ms(3, 8, 48) == pytest.approx(halfway)
    assert sum(cost.slot_cost(i, widths[i - 1] if i else None, w) for i, w in enumerate(widths)) + 0.25 == \
        pytest.approx(cost.cost(widths))


def test_latency_cost_of_a_multibranch_model_expands_stages_into_layers():
    model = RepVGG([2, 1, 1, 1], widths=[8, 16, 16, 32, 32], num_classes=10)
    specs = plain_specs(model)  # 3->8 | 8->16, 16->16 | 16->16 | 16->32 | 32->32
    shapes = [LayerShape(1, 1, 1, i == 0, [s.in_channels], [s.out_channels], [[i + 1.0]], [[i + 1.0]])
              for i, s in enumerate(specs)]
    table = LatencyTable({}, shapes, list(range(len(specs))), 3)
    cost = LatencyCost(table, model)
    assert cost.cost((8, 16, 16, 32, 32)) == 1 + 2 + 3 + 4 + 5 + 6
    assert cost.slot_cost(1, 8, 16) == 2 + 3  # stage1's two layers: 8->16, then 16->16


# ---- the budget search on a hand-made chain --------------------------------------------------------------------
class StepLatency:
    """A latency with plateaus: each layer costs by the 32-channel blocks it touches, so 40 and 64 cost the same."""

    unit = "ms"

    def __init__(self, weights: list[float]):
        self.weights = weights

    def slot_cost(self, i, width_in, width):
        blocks_in = 1 if width_in is None else math.ceil(width_in / 32)
        return self.weights[i] * blocks_in * math.ceil(width / 32)

    def cost(self, widths):
        return 0.5 + sum(self.slot_cost(i, widths[i - 1] if i else None, w) for i, w in enumerate(widths))


def brute_force(choices, kept, cost, budget):
    best = None
    for pick in itertools.product(*(range(len(c)) for c in choices)):
        widths = tuple(c[k] for c, k in zip(choices, pick))
        if cost.cost(widths) <= budget:
            value = sum(v[k] for v, k in zip(kept, pick))
            best = value if best is None else max(best, value)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_budget_search_matches_brute_force_and_takes_plateaus_at_their_widest(seed):
    rng = np.random.default_rng(seed)
    choices = [list(range(16, 97, 8)) for _ in range(3)]
    kept = [np.cumsum(rng.uniform(0.1, 2.0, len(c))).tolist() for c in choices]  # importance grows with width
    cost = StepLatency(rng.uniform(0.5, 2.0, 3).tolist())
    full = cost.cost([c[-1] for c in choices])
    budget = float(rng.uniform(0.3, 0.8)) * full
    widths = select_within_budget(choices, kept, cost, budget, "prune.keep_latency=x")
    assert cost.cost(widths) <= budget
    value = sum(v[c.index(w)] for v, c, w in zip(kept, choices, widths))
    assert value == pytest.approx(brute_force(choices, kept, cost, budget))
    for i, w in enumerate(widths):  # no slot could be wider at the same latency
        if w < choices[i][-1]:
            wider = list(widths)
            wider[i] = choices[i][choices[i].index(w) + 1]
            assert cost.cost(wider) > cost.cost(widths)
    assert all(w % 32 == 0 or w == choices[i][-1] for i, w in enumerate(widths))  # plateaus end at 32-multiples


def test_budget_below_the_narrowest_widths_fails_in_one_line():
    choices = [[16, 32], [16, 32]]
    with pytest.raises(ValueError, match=r"^prune\.target_ms=0\.1 is not reachable: the narrowest widths allowed cost "
                                         r"2\.5 ms, over the budget of 0\.1 ms [^\n]*$"):
        select_within_budget(choices, [[1, 2], [1, 2]], StepLatency([1.0, 1.0]), 0.1, "prune.target_ms=0.1")


def test_with_no_value_to_tell_plans_apart_the_budget_goes_to_channels():
    """Scores of zero (a criterion that sees nothing, e.g. Taylor on an untrained model): the plan still spends the
    budget, on the most channels it buys, instead of stopping at the cheapest widths."""
    choices = [list(range(16, 97, 8)) for _ in range(3)]
    cost = StepLatency([1.0, 1.0, 1.0])
    budget = 0.6 * cost.cost([c[-1] for c in choices])
    widths = select_within_budget(choices, [[0.0] * len(c) for c in choices], cost, budget, "prune.keep_latency=x")
    best = max(sum(w) for w in itertools.product(*choices) if cost.cost(w) <= budget)
    assert sum(widths) == best and cost.cost(widths) <= budget
