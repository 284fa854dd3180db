"""Importance in loss units: the Taylor estimate against brute-force loss changes, the sensitivity curves, their
cache, and the floors the budget planner keeps."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from compress.prune import PruneOptions, Target, prune_model
from compress.prune.importance import slot_values
from compress.prune.loss_units import (
    TaylorImportance,
    grid_widths,
    sensitivity_values,
    slot_outputs,
    taylor_scores,
)
from compress.prune.slots import slots_of
from repvgg import LayerSpec, PlainRepVGG

SPECS = [LayerSpec(3, 16, 1, 1), LayerSpec(16, 32, 2, 1), LayerSpec(32, 32, 1, 1), LayerSpec(32, 48, 2, 1)]


pytestmark = pytest.mark.usefixtures("one_thread")


def fitted_plain(seed: int = 0) -> tuple[PlainRepVGG, list]:
    """A tiny plain model trained a few steps on a fixed random task (so its loss is near a minimum, where the
    mean gradient alone would say little), and batches of that task."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = PlainRepVGG(SPECS, 4)
    x = torch.randn(64, 3, 12, 12, generator=g)
    y = torch.randint(0, 4, (64,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]


def loss_without(model, batches, layer: int, channel: int) -> float:
    mask = torch.ones(model.layers[layer].conv.out_channels)
    mask[channel] = 0
    handle = model.layers[layer].register_forward_hook(lambda _m, _i, out: out * mask.view(1, -1, 1, 1))
    try:
        with torch.no_grad():
            return float(sum(F.cross_entropy(model(x), y) for x, y in batches) / len(batches))
    finally:
        handle.remove()


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


def test_taylor_scores_rank_channels_as_their_brute_force_loss_changes():
    model, batches = fitted_plain()
    batch = batches[:1]  # one batch: the score is the squared first-order change of that batch's loss
    with torch.no_grad():
        base = float(F.cross_entropy(model(batch[0][0]), batch[0][1]))
    scores = taylor_scores(model, batch, torch.device("cpu"))
    for layer in (1, 2):
        change = np.array([loss_without(model, batch, layer, c) - base for c in range(len(scores[layer]))])
        assert rank_correlation(scores[layer].numpy(), change**2) > 0.5, layer
    assert all(p.grad is None for p in model.parameters())  # nothing left behind


def test_taylor_prune_removes_the_lowest_scored_channels():
    model, batches = fitted_plain()
    reference = copy.deepcopy(model)
    scores = taylor_scores(reference, batches, torch.device("cpu"))
    options = PruneOptions(target=Target("channel_ratio", 0.5), importance="taylor", round_to=8, gradient_batches=4)
    prune_model(model, options, batches[0][0][:1], batches=batches)
    for layer, score in ((1, scores[1]), (2, scores[2])):
        kept = model.layers[layer].conv.out_channels
        top = score.argsort(descending=True)[:kept].sort().values
        assert kept < len(score)  # the kept filters are the reference's top-scored ones, in order
        assert torch.equal(model.layers[layer].conv.bias, reference.layers[layer].conv.bias[top])


def test_sensitivity_curves_are_measured_cached_and_reused(tmp_path, monkeypatch):
    model, batches = fitted_plain()
    options = PruneOptions(target=Target("keep_macs", 0.5), importance="sensitivity", round_to=8,
                           gradient_batches=2, sensitivity_images=48, sensitivity_grid=3,
                           sensitivity_cache=tmp_path / "curves.json")
    slots = slots_of(model, options, 8)
    importance = TaylorImportance()
    importance.refresh(model, batches[:2], torch.device("cpu"))
    example = batches[0][0][:1]
    values, info = slot_values(model, example, importance, slots, options, batches)
    assert not info["reused"] and info["images"] == 48 and (tmp_path / "curves.json").exists()
    for v, slot in zip(values, slots):  # one value per width, never lower for a wider slot
        assert len(v) == len(slot.choices()) and all(b >= a for a, b in zip(v, v[1:]))
    widths = [s.choices()[0] for s in slots if s.prunable]
    assert len(widths) == 3 and all(len(grid_widths(s, 3)) <= 3 for s in slots)

    import compress.prune.importance as importance_module

    def not_again(*_args, **_kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(importance_module, "sensitivity_curves", not_again)
    again, info = slot_values(model, example, importance, slots, options, batches)
    assert info["reused"] and again == values
    with torch.no_grad():  # other weights: other curves, measured afresh
        model.layers[2].conv.weight.mul_(0.5)
    with pytest.raises(AssertionError, match="measured again"):
        slot_values(model, example, importance, slots, options, batches)


def test_sensitivity_values_interpolate_and_never_drop_with_width():
    class Slot:
        init, unit, groups, prunable = 32, 8, 1, True

        def choices(self):
            return [8, 16, 24, 32]

    curves = {"base_loss": 1.0, "curves": [{"widths": [8, 24, 32], "loss_increase": [0.4, 0.0, 0.1]}]}
    (values,) = sensitivity_values(curves, [Slot()])
    assert values[0] == pytest.approx(-0.4, abs=1e-5) and values[1] == pytest.approx(-0.2, abs=1e-5)
    assert values[3] >= values[2] >= values[1]  # 0.1 at full width measured above 0.0 at 24: noise, not kept


@pytest.mark.parametrize("importance", ["taylor", "sensitivity"])
def test_loss_unit_plans_keep_the_floors(importance):
    model, batches = fitted_plain()
    for floors, least in (({"min_width": 16}, [16, 16, 16]), ({"max_layer_ratio": 0.5}, [16, 16, 24])):
        pruned = copy.deepcopy(model)
        options = PruneOptions(target=Target("keep_macs", 0.5), importance=importance, round_to=8,
                               gradient_batches=2, sensitivity_images=32, sensitivity_grid=3, **floors)
        report = prune_model(pruned, options, batches[0][0][:1], batches=batches)
        assert report["planner"] == "budget" and report["values"]["units"]
        assert all(w >= m for w, m in zip(report["widths_after"][1:], least)), (floors, report["widths_after"])
        assert report["keep_macs_achieved"] <= 0.5


def test_slot_outputs_follow_the_slots():
    model, _ = fitted_plain()
    outputs = slot_outputs(model)
    assert [m[0] for m in outputs] == list(model.layers)
