"""ResRep (`compress.prune.resrep`): the merge of compactors is exact, masks follow the compactor rows' norms, the
cost target is met within its width granularity after a real (short) training, the lasso strength follows the
budget, and the recipe refuses what ResRep cannot go with, in one line."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import one_line_error

from compress.prune import PruneOptions, Target
from compress.prune.cost import ChainMacCost
from compress.prune.resrep import (
    ResRepOptions,
    ResRepSchedule,
    add_compactors,
    compactor_weights,
    compactors_of,
    lasso_for,
    merge_compactors,
    resrep_prune,
)
from compress.prune.slots import slots_of
from compress.train import make_optimizer
from repvgg import LayerSpec, PlainRepVGG, fold_bn, insert_bn

SPECS = [LayerSpec(3, 8, 2), LayerSpec(8, 32), LayerSpec(32, 32, 2), LayerSpec(32, 64)]
IMAGE = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))

pytestmark = pytest.mark.usefixtures("one_thread")


def plain(seed: int = 0) -> PlainRepVGG:
    torch.manual_seed(seed)
    return PlainRepVGG(SPECS, num_classes=10).eval()


def images(seed: int, n: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def options(keep: float = 0.5, round_to: int = 4) -> PruneOptions:
    return PruneOptions(target=Target("keep_macs", keep), round_to=round_to, reconstruct=False)


@torch.no_grad()
def test_merged_model_equals_the_compactor_model_with_its_masked_rows_zeroed():
    model = plain()
    insert_bn(model, [images(2)])  # the fine-tune's temporary BN sits between conv and compactor
    for layer in model.layers:  # BN statistics and affine away from their exact start
        layer.bn.running_mean.normal_(0, 0.1)
        layer.bn.weight.uniform_(0.5, 1.5)
    compactors = add_compactors(model, slots_of(model, options(), 4))
    g = torch.Generator().manual_seed(3)
    for c in compactors[1:]:
        c.weight.copy_(torch.randn(c.weight.shape, generator=g))
        c.mask.copy_(torch.rand(len(c.mask), generator=g) > 0.4)
        c.weight[~c.mask] = 0  # what the lasso drives them to
    x = images(4)
    reference = model(x)
    fold_bn(model)
    widths = merge_compactors(model)
    assert compactors_of(model) == [None] * len(SPECS)
    assert widths == [8, *(int(c.mask.sum()) for c in compactors[1:])]
    assert model.widths() == widths and model.linear.in_features == widths[-1]
    # FP32 reassociation: random compactors scale the logits (up to about 1e4), so the tolerance follows their scale,
    # a few float32 roundings of the largest; a wrong merge is off by the order of the logits themselves
    torch.testing.assert_close(model(x), reference, rtol=1e-4, atol=1e-6 * float(reference.abs().max()))


def test_masks_follow_the_row_norms_globally_and_within_each_layer():
    model = plain()
    slots = slots_of(model, options(round_to=1), 1)
    compactors = add_compactors(model, slots)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for c in compactors[1:]:  # each row scaled to a norm of its own
            c.weight.mul_(torch.rand(len(c.mask), 1, 1, 1, generator=g) + 0.1)
    cost = ChainMacCost(model, IMAGE).summed
    before = cost(model.widths())
    schedule = ResRepSchedule(compactors, slots, cost, 0.5 * before, "prune.keep_macs=0.5", ResRepOptions(), 1.0,
                              [0.01] * 100)
    widths = schedule.choose_masks(0.6 * before)
    assert cost(widths) <= 0.6 * before < cost([w + (w < s.init) for w, s in zip(widths, slots)])
    masked = torch.cat([c.row_norms()[~c.mask] for c in compactors[1:]])
    kept = torch.cat([c.row_norms()[c.mask] for c in compactors[1:]])
    assert len(masked) > 0 and masked.max() <= kept.min()  # at width granularity 1, the smallest norms, globally
    assert widths == schedule.widths()

    coarse = slots_of(model, options(round_to=8), 8)  # at granularity 8, a layer's kept count rounds up...
    schedule = ResRepSchedule(compactors, coarse, cost, 0.5 * before, "prune.keep_macs=0.5", ResRepOptions(), 1.0,
                              [0.01] * 100)
    widths = schedule.choose_masks(0.6 * before)
    assert all(w % 8 == 0 for w in widths[1:]) and cost(widths) <= 0.6 * before
    for c in compactors[1:]:  # ...and within the layer the masked rows are still its smallest
        norms = c.row_norms()
        if not c.mask.all():
            assert norms[~c.mask].max() <= norms[c.mask].min()


def test_a_short_training_meets_the_mac_target_and_walks_the_masked_rows_to_zero():
    model = plain()
    reference = copy.deepcopy(model)
    steps = 60
    x_all = images(7, 256)
    with torch.no_grad():
        y_all = reference(x_all).argmax(1)  # a task the unpruned model solves: its own labels

    def train(m, before_step) -> dict:
        optimizer = make_optimizer(m, _optim(), frozenset(compactor_weights(m)))
        m.train()
        for step in range(steps):
            idx = torch.arange(step * 16, step * 16 + 16) % len(x_all)
            loss = F.cross_entropy(m(x_all[idx]), y_all[idx])
            optimizer.zero_grad()
            loss.backward()
            before_step(step)
            optimizer.step()
        return {"top1": None}

    compactor_groups = []

    def spying_train(m, before_step):
        names = compactor_weights(m)
        groups = make_optimizer(m, _optim(), frozenset(names)).param_groups
        compactor_groups.extend((g["momentum"], g["weight_decay"]) for g in groups
                                if any(p is q for n, q in m.named_parameters() if n in names for p in g["params"]))
        return train(m, before_step)

    lrs = [0.01] * steps
    report = resrep_prune(model, options(0.5), ResRepOptions(first_mask=0.1, mask_every=0.1, target_by=0.5),
                          IMAGE, spying_train, lrs)
    assert compactor_groups == [(0.0, 0.0)]  # compactors: one group, no momentum, no weight decay
    assert 0.45 <= report["keep_macs_achieved"] <= 0.5  # met, within the width granularity (4 channels)
    assert report["resrep"]["mask_steps"] == [6, 12, 18, 24, 30]
    goals = [t["goal"] for t in report["resrep"]["trace"]]
    assert goals == sorted(goals, reverse=True) and len(goals) == 5  # the goal falls to the target, then is held
    assert report["resrep"]["lasso"] == pytest.approx(lasso_for(lrs, 30))
    assert report["resrep"]["masked_max"] == 0  # the capped steps land on zero: the cut changes nothing
    assert report["widths_after"] == model.widths() and report["widths_after"][0] == 8


def test_lasso_strength_follows_the_budget():
    # twice 1 / sum(lr after target_by): a four times longer held stretch, a four times weaker lasso
    assert lasso_for([0.1] * 100, 50) == pytest.approx(2 / 5.0)
    assert lasso_for([0.1] * 400, 200) == pytest.approx(lasso_for([0.1] * 100, 50) / 4)


def _optim():
    from compress.recipe import FinetuneCfg

    return FinetuneCfg(lr=0.01, weight_decay=5e-4)


@pytest.mark.parametrize("setting, culprit", [
    ({"prune": {"method": "resrep", "reconstruct": True}}, "prune.reconstruct=True"),
    ({"prune": {"method": "resrep", "channel_ratio": 0.3}}, "prune.channel_ratio=0.3"),
    ({"prune": {"method": "resrep", "mode": "multibranch"}}, "prune.mode=multibranch"),
    ({"prune": {"method": "resrep"}, "finetune": {"structure": "rebranch"}}, "finetune.structure=rebranch"),
    ({"prune": {"method": "resrep"}, "finetune": {"ema_decay": 0.99}}, "finetune.ema_decay=0.99"),
    ({"prune": {"method": "resrep"}, "finetune": {"optimizer": "adamw"}}, "finetune.optimizer=adamw"),
    ({"prune": {"method": "resrep", "resrep": {"first_mask": 0.6, "target_by": 0.5}}}, "first_mask"),
])
def test_what_resrep_cannot_go_with_is_one_line(tiny_recipe, capsys, setting, culprit):
    line = one_line_error(capsys, ["run", "--recipe", str(tiny_recipe(**setting)), "--dry-run"])
    assert culprit in line
