"""Channel pruning: MAC targets for every criterion and scope, coupling, grouped convs, exact re-parameterization,
checkpoint round trips, iterative steps, the BN insert/fold helpers for fine-tuning a plain stack, and the options
and importance table the pruner reads."""

import copy

import pytest
import torch
import torch_pruning as tp
from pydantic import ValidationError
from torch import nn

from compress.files import load_model, save_model
from compress.prune import LATENCY_KINDS, TARGET_KINDS, TOLERANCE, PruneError, PruneOptions, Target, prune_model
from compress.prune.importance import IMPORTANCES, Criterion, HessianImportance, gradient_batches, make_importance
from compress.recipe import PruneCfg
from repvgg import PlainRepVGG, RepVGG, fold_bn, insert_bn, reparameterize

BLOCKS, WIDTHS = [2, 2, 2, 1], [16, 32, 64, 128, 256]
STAGES = [[0], [1, 2], [3, 4], [5, 6], [7]]  # block indices of each stage
GROUPWISE = {2: 2, 3: 4, 4: 2, 6: 4}  # stage1 b1, stage2 b0 / b1, stage3 b1
IMAGE = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
BATCH = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(groups=None, seed: int = 0) -> RepVGG:
    """A small RepVGG in eval mode with random BN statistics (so re-param errors and ranking differences show)."""
    torch.manual_seed(seed)
    model = RepVGG(BLOCKS, widths=WIDTHS, num_classes=10, override_groups_map=groups)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.normal_(0, 0.5)
            bn.running_var.uniform_(0.1, 2.1)
            bn.weight.normal_()
            bn.bias.normal_(0, 0.3)
    return model.eval()


def data(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(n)]


def options(kind: str = "keep_macs", value: float = 0.5, **kwargs) -> PruneOptions:
    return PruneOptions(**{"target": Target(kind, value), "round_to": 8, "gradient_batches": 2, **kwargs})


def specs(model):
    return model.layer_specs() if isinstance(model, PlainRepVGG) else [b.spec for b in model.blocks()]


def assert_exact_reparam(model: RepVGG) -> None:
    with torch.no_grad():
        out = model(BATCH)
        diff = (reparameterize(model)(BATCH) - out).abs().max()
    assert diff <= 1e-5 * out.abs().max()


@pytest.mark.parametrize("scope", ["global", "local"])
@pytest.mark.parametrize("importance", ["l1", "l2", "taylor", "sensitivity", "hessian", "lamp", "random"])
def test_every_criterion_and_scope_reaches_keep_macs(importance, scope):
    model = reparameterize(tiny())
    report = prune_model(model, options(importance=importance, scope=scope), IMAGE, batches=data())
    assert abs(report["macs_after"] / report["macs_before"] - 0.5) <= TOLERANCE == 0.02
    assert report["keep_macs_achieved"] == report["macs_after"] / report["macs_before"]
    assert (report["macs_after"], report["params_after"]) == tp.utils.count_ops_and_params(model, IMAGE)
    assert report["params_after"] < report["params_before"]
    assert report["widths_before"] == [16, 32, 32, 64, 64, 128, 128, 256] and report["groups"] == 8
    widths = report["widths_after"]
    assert widths == model.widths() and widths[0] == 16  # the first layer is not pruned
    assert all(w % 8 == 0 and w <= w0 for w, w0 in zip(widths, report["widths_before"]))
    # global scope plans within the MAC budget (no ratio), local scope bisects one ratio for every layer
    assert report["planner"] == ("budget" if scope == "global" else "ranking")
    assert (report["channel_ratio"] is None) if scope == "global" else 0 < report["channel_ratio"] < 1
    assert model(BATCH).shape == (4, 10)


def test_global_plain_prunes_layers_of_a_stage_differently():
    """Half the channels of stage2's first layer carry almost nothing: a global ranking takes those first,
    so the two layers of the stage end with different widths (the multi-branch model could not)."""
    model = reparameterize(tiny())
    weak = slice(0, 32)
    with torch.no_grad():
        model.layers[3].conv.weight[weak] *= 1e-3
        model.layers[3].conv.bias[weak] *= 1e-3
        model.layers[4].conv.weight[:, weak] *= 1e-3
    report = prune_model(model, options("keep_macs", 0.6, importance="l2", scope="global"), IMAGE)
    widths = report["widths_after"]
    assert widths[3] <= 32 < widths[4]
    assert abs(report["keep_macs_achieved"] - 0.6) <= TOLERANCE


def test_multibranch_keeps_one_width_per_stage_and_exact_reparam():
    model = tiny()
    report = prune_model(model, options("keep_macs", 0.6, mode="multibranch", importance="l1"), IMAGE)
    widths = report["widths_after"]
    assert widths == [b.spec.out_channels for b in model.blocks()] and report["groups"] == 5
    assert all(len({widths[i] for i in stage}) == 1 for stage in STAGES)
    assert sum(widths) < sum(report["widths_before"]) and widths[0] == 16
    assert abs(report["keep_macs_achieved"] - 0.6) <= TOLERANCE
    assert model.config()["widths"] == [widths[stage[0]] for stage in STAGES]
    assert_exact_reparam(model)


def kept_channels(original: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Which original channels survived, found by their (distinct, random) biases."""
    return [int((original == b).nonzero()) for b in pruned]


@pytest.mark.parametrize("mode", ["plain", "multibranch"])
def test_groupwise_pruning_keeps_divisibility_and_is_a_subnetwork(mode):
    model = tiny(GROUPWISE)
    if mode == "plain":
        model = reparameterize(model)
    original = [(s.conv.weight.clone(), s.conv.bias.clone()) for s in getattr(model, "layers", [])]
    groups_before = [s.groups for s in specs(model)]
    report = prune_model(model, options(mode=mode, scope="global"), IMAGE)
    assert abs(report["keep_macs_achieved"] - 0.5) <= TOLERANCE
    for i, spec in enumerate(specs(model)):
        spec.check(f"layer {i}")  # in and out channels divisible by the groups
    assert [s.groups for s in specs(model)] == groups_before
    grouped = [i for i, g in enumerate(groups_before) if g > 1]
    assert any(report["widths_after"][i] < report["widths_before"][i] for i in grouped)
    if mode == "multibranch":
        assert_exact_reparam(model)
        return
    # TP removed whole filters and the matching input slices, the same in-group positions in every group
    kept_in = list(range(3))
    for layer, (weight, bias) in zip(model.layers, original):
        conv = layer.conv
        kept_out = kept_channels(bias, conv.bias)
        per_group = weight.shape[1]
        local = [c % per_group for c in kept_in]
        assert local == local[: len(local) // conv.groups] * conv.groups
        assert torch.equal(conv.weight, weight[kept_out][:, local[: conv.in_channels // conv.groups]])
        kept_in = kept_out


@pytest.mark.parametrize("mode", ["plain", "multibranch"])
def test_pruned_model_checkpoint_round_trip_is_bit_exact(mode, tmp_path):
    model = tiny(GROUPWISE) if mode == "multibranch" else reparameterize(tiny())
    report = prune_model(model, options("channel_ratio", 0.25, mode=mode, scope="local"), IMAGE)
    assert report["channel_ratio"] == 0.25
    if mode == "plain":  # uniform ratio: int(w * 0.75) floored to round_to
        assert report["widths_after"] == [16, 24, 24, 48, 48, 96, 96, 192]
    save_model(model, tmp_path / "pruned.pt")
    loaded = load_model(tmp_path / "pruned.pt").eval()
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(loaded(BATCH), model(BATCH))


def test_iterative_steps_call_between_steps_and_reach_the_target():
    model = reparameterize(tiny())
    seen = []

    def finetune(m, step):  # stands in for the pipeline's fine-tune: moves the weights
        seen.append((step, m.widths()))
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 1e-3)

    report = prune_model(model, options(importance="taylor", steps=3), IMAGE, data(), finetune)
    assert [step for step, _ in seen] == [0, 1]
    first, second, final = seen[0][1], seen[1][1], report["widths_after"]
    assert all(a >= b >= c for a, b, c in zip(first, second, final))
    assert first != report["widths_before"] and second != final
    assert abs(report["keep_macs_achieved"] - 0.5) <= TOLERANCE


def test_insert_bn_then_fold_bn_keep_outputs():
    model = reparameterize(tiny())
    with torch.no_grad():
        reference = model(BATCH)
        insert_bn(model, data(), max_batches=2)
        assert all(isinstance(layer.bn, nn.BatchNorm2d) for layer in model.layers)
        assert (model(BATCH) - reference).abs().max() <= 1e-5 * reference.abs().max()
        for layer in model.layers:  # training moves the BN: folding must follow it exactly
            layer.bn.running_mean.add_(0.1)
            layer.bn.weight.mul_(1.5)
        with_bn = model(BATCH)
        fold_bn(model)
        assert all(isinstance(layer.bn, nn.Identity) for layer in model.layers)
        assert (model(BATCH) - with_bn).abs().max() <= 1e-5 * with_bn.abs().max()


def test_insert_bn_scales_each_conv_channels_gradient_by_the_root_of_its_output_std():
    """A layer whose outputs have std ~8 (its weights x8, the next layer's /8: the same function) gets conv
    gradients at most sqrt(std) times those without the BN, channel by channel; standardising the conv would make
    it std times."""
    model = reparameterize(tiny())
    images, labels = data(1)[0]
    with torch.no_grad():
        model.layers[2].conv.weight.mul_(8)
        model.layers[2].conv.bias.mul_(8)
        model.layers[3].conv.weight.div_(8)

    def conv_grad(m) -> torch.Tensor:
        m.zero_grad()
        nn.functional.cross_entropy(m.train()(images), labels).backward()
        return m.layers[2].conv.weight.grad.flatten(1).norm(dim=1)

    plain = conv_grad(model)
    with_bn = insert_bn(copy.deepcopy(model), [(images, labels)])  # its statistics: this very batch
    sigma = with_bn.layers[2].bn.weight.detach()
    assert sigma.max() > 4  # where sqrt(std) and std part
    assert torch.all(conv_grad(with_bn) <= 1.05 * sigma.sqrt() * plain + 1e-12)


def test_hessian_accumulates_every_sample():
    """TP 1.6 overwrites the accumulated squared gradient with each sample; ours averages them."""
    layer = nn.Linear(2, 1, bias=False)
    importance = HessianImportance()
    for g in (1.0, 3.0):
        layer.weight.grad = torch.full_like(layer.weight, g)
        importance.accumulate_grad(layer)
    importance.flush()
    assert torch.equal(layer.weight.grad, torch.full_like(layer.weight, 5.0))


@pytest.mark.parametrize("importance", ["taylor", "hessian"])
def test_gradient_criteria_without_data_fail_in_one_line(importance):
    with pytest.raises(ValueError, match=rf"^prune\.importance={importance} needs training batches$"):
        prune_model(reparameterize(tiny()), options(importance=importance), IMAGE)


def test_mode_mismatch_and_unreachable_target_fail_in_one_line():
    with pytest.raises(ValueError, match=r"^prune\.mode=multibranch needs a RepVGG, got a PlainRepVGG$"):
        prune_model(reparameterize(tiny()), options(mode="multibranch"), IMAGE)
    with pytest.raises(ValueError, match=r"^prune\.keep_macs=0\.05 is not reachable: [^\n]*$"):
        prune_model(reparameterize(tiny()), options("keep_macs", 0.05, max_layer_ratio=0.5), IMAGE)
    with pytest.raises(ValueError, match=r"^prune\.keep_macs=0\.05 is not reachable within ±2%: [^\n]*$"):
        prune_model(reparameterize(tiny()), options("keep_macs", 0.05, max_layer_ratio=0.5, planner="ranking"), IMAGE)


def test_min_width_keeps_every_pruned_layer_at_least_that_wide():
    report = prune_model(reparameterize(tiny()), options("channel_ratio", 0.7, scope="global", min_width=20), IMAGE)
    assert min(report["widths_after"][1:]) == 24  # 20 rounded up to round_to (the unpruned first layer has 16)
    free = prune_model(reparameterize(tiny()), options("channel_ratio", 0.7, scope="global"), IMAGE)
    assert min(free["widths_after"][1:]) == 8


@pytest.mark.parametrize("bad", [{"keep_macs": 0}, {"keep_macs": 1.0}, {"importance": "fisher"}])
def test_recipe_rejects_bad_prune_settings(bad):
    with pytest.raises(ValidationError):
        PruneCfg(**bad)


def test_the_target_alone_decides_whether_it_is_a_latency_target():
    assert set(LATENCY_KINDS) < set(TARGET_KINDS)
    assert {kind: Target(kind, 0.5).latency for kind in TARGET_KINDS} == {
        "keep_macs": False, "channel_ratio": False, "keep_latency": True, "target_ms": True}
    assert PruneOptions().target == Target("keep_macs", 0.5) and Target("target_ms", 5).name == "prune.target_ms=5.0"


@pytest.mark.parametrize("kind, value, message", [
    ("keep_macs", 1.0, r"prune\.keep_macs: 1\.0 is not in \(0, 1\)"),
    ("channel_ratio", 0, r"prune\.channel_ratio: 0\.0 is not in \(0, 1\)"),
    ("target_ms", -1, r"prune\.target_ms: -1\.0 is not above 0"),
    ("keep_params", 0.5, r"prune: unknown target 'keep_params'; give one of keep_macs, [^\n]*"),
])
def test_a_bad_target_fails_in_one_line(kind, value, message):
    with pytest.raises(PruneError, match=rf"^{message}$"):
        Target(kind, value)


def test_the_importance_table_drives_make_importance_and_the_gradient_check(monkeypatch):
    made = []

    def factory():
        made.append(tp.importance.TaylorImportance())
        return made[-1]

    monkeypatch.setitem(IMPORTANCES, "test-taylor", Criterion(factory, needs_gradients=True))
    assert make_importance("test-taylor") is made[0]
    opts = options(importance="test-taylor")
    assert len(gradient_batches(opts, data(3))) == opts.gradient_batches == 2
    with pytest.raises(PruneError, match=r"^prune\.importance=test-taylor needs training batches$"):
        prune_model(reparameterize(tiny()), opts, IMAGE)
    report = prune_model(reparameterize(tiny()), opts, IMAGE, batches=data())  # Taylor scores need the gradients
    assert abs(report["keep_macs_achieved"] - 0.5) <= TOLERANCE and len(made) == 2
    monkeypatch.setitem(IMPORTANCES, "test-l1", Criterion(lambda: tp.importance.MagnitudeImportance(p=1)))
    assert gradient_batches(options(importance="test-l1"), None) == []  # reads no batches, needs none
    with pytest.raises(PruneError, match=r"^prune\.importance: unknown criterion 'fisher'; valid: l1, l2, [^\n]*$"):
        make_importance("fisher")
