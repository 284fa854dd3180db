import pytest
import torch
import torch_pruning as tp

from repvgg import (
    CONFIGS,
    PlainRepVGG,
    RepVGG,
    channel_groups,
    create_model,
    load_official_state_dict,
    reparameterize,
)

# Facts file: plain model, 1000 classes, 224x224, counted with Torch-Pruning (MACs in G, params in M).
FACTS = {
    "RepVGG-A0": (1.37, 8.31),
    "RepVGG-A1": (2.37, 12.79),
    "RepVGG-A2": (5.12, 25.50),
    "RepVGG-B0": (3.06, 14.34),
    "RepVGG-B1": (11.83, 51.83),
    "RepVGG-B1g2": (8.82, 41.36),
    "RepVGG-B1g4": (7.32, 36.13),
    "RepVGG-B2": (18.39, 80.32),
    "RepVGG-B3": (26.22, 110.96),
}


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics, so a re-param that ignores any of them fails."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.3)
    return model.eval()


def assert_equivalent(a, b, x):
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert (ya - yb).abs().max() <= 1e-5 * ya.abs().max()


@pytest.mark.parametrize("name", list(FACTS))
def test_params_and_macs_match_facts(name):
    # Built straight from the layer specs: the plain twin of a named config, without training-time weights.
    train_model = create_model(name, num_classes=1000)
    plain = PlainRepVGG([b.spec for b in train_model.blocks()], 1000)
    macs, params = tp.utils.count_ops_and_params(plain, torch.zeros(1, 3, 224, 224))
    want_macs, want_params = FACTS[name]
    assert abs(macs / 1e9 - want_macs) / want_macs < 0.005
    assert abs(params / 1e6 - want_params) / want_params < 0.005


def test_every_named_config_builds_with_stage_widths():
    assert len(CONFIGS) == 13
    a0 = create_model("A0")
    assert a0.config()["widths"] == [48, 48, 96, 192, 1280]
    assert [len(getattr(a0, f"stage{s}")) for s in range(1, 5)] == [2, 4, 14, 1]
    g4 = create_model("RepVGG-B1g4")
    groups = [b.spec.groups for b in g4.blocks()]
    assert groups[0] == 1 and groups[1] == 1 and groups[2] == 4 and groups[26] == 4 and groups[27] == 1
    assert g4.stage1[1].rbr_1x1.conv.groups == 4  # the 1x1 branch shares the 3x3's groups


@pytest.mark.parametrize("name,size,stem", [("A0", 224, 2), ("A0", 32, 1), ("B1g4", 32, 1)])
def test_reparam_is_exact_with_random_bn(name, size, stem):
    model = randomize_bn(create_model(name, num_classes=10, stem_stride=stem))
    x = torch.randn(2, 3, size, size)
    plain = reparameterize(model)
    assert_equivalent(model, plain, x)
    assert model.training is False and plain.training is False
    assert isinstance(model, RepVGG)  # untouched: still the multi-branch model, with its branches
    assert model.stage1[1].rbr_identity is not None


def test_stem_stride_one_keeps_32x32_through_stage0():
    model = create_model("A0", num_classes=10, stem_stride=1).eval()
    assert model.stage0(torch.zeros(1, 3, 32, 32)).shape[-1] == 32


def test_equivalent_kernel_is_differentiable():
    block = randomize_bn(create_model("A0", num_classes=10)).stage1[1]
    kernel, bias = block.equivalent_kernel_bias()
    (kernel.square().sum() + bias.sum()).backward()
    assert block.rbr_dense.conv.weight.grad is not None and block.rbr_identity.weight.grad is not None


def test_plain_model_rebuilds_from_its_specs():
    plain = reparameterize(randomize_bn(small_groupwise()))
    rebuilt = PlainRepVGG.from_config(plain.config())
    rebuilt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(rebuilt.eval()(x), plain(x))


def small_groupwise(num_classes: int = 10) -> RepVGG:
    return RepVGG([2, 2, 2, 1], widths=[16, 16, 32, 64, 128], override_groups_map={2: 2, 4: 4}, num_classes=num_classes)


def official_layout_state_dict(model: RepVGG, prefix: str = "") -> dict:
    """A state dict keyed the way the public release names things, built from key names alone."""
    state = {}
    for stage in range(5):
        blocks = [model.stage0] if stage == 0 else list(getattr(model, f"stage{stage}"))
        for k, block in enumerate(blocks):
            name = "stage0" if stage == 0 else f"stage{stage}.{k}"
            for branch in ("rbr_dense", "rbr_1x1"):
                seq = getattr(block, branch)
                state[f"{prefix}{name}.{branch}.conv.weight"] = seq.conv.weight.detach().clone()
                for p, v in seq.bn.state_dict().items():
                    state[f"{prefix}{name}.{branch}.bn.{p}"] = v.clone()
            if block.rbr_identity is not None:
                for p, v in block.rbr_identity.state_dict().items():
                    state[f"{prefix}{name}.rbr_identity.{p}"] = v.clone()
    state[f"{prefix}linear.weight"] = model.linear.weight.detach().clone()
    state[f"{prefix}linear.bias"] = model.linear.bias.detach().clone()
    return state


@pytest.mark.parametrize("prefix", ["", "module."])
def test_official_training_checkpoint_loads_strict_and_converts(prefix):
    ref = randomize_bn(small_groupwise())
    state = official_layout_state_dict(ref, prefix)
    loaded = load_official_state_dict(state).eval()
    assert isinstance(loaded, RepVGG)
    assert loaded.override_groups_map == {2: 2, 4: 4}
    x = torch.randn(2, 3, 64, 64)
    assert_equivalent(ref, loaded, x)
    assert_equivalent(loaded, reparameterize(loaded), x)


def test_official_inference_checkpoint_loads():
    ref = reparameterize(randomize_bn(create_model("A0", num_classes=10)))
    state = {}
    names = ["stage0"] + [f"stage{s}.{k}" for s, n in enumerate([2, 4, 14, 1], 1) for k in range(n)]
    for name, layer in zip(names, ref.layers):
        state[f"module.{name}.rbr_reparam.weight"] = layer.conv.weight
        state[f"module.{name}.rbr_reparam.bias"] = layer.conv.bias
    state["module.linear.weight"], state["module.linear.bias"] = ref.linear.weight, ref.linear.bias
    loaded = load_official_state_dict(state)
    assert isinstance(loaded, PlainRepVGG) and loaded.layer_specs() == ref.layer_specs()
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(loaded.eval()(x), ref(x))


def test_foreign_state_dict_names_first_offending_key():
    state = official_layout_state_dict(create_model("A0", num_classes=10))
    state["features.0.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="'features.0.weight'"):
        load_official_state_dict(state)
    state = official_layout_state_dict(create_model("A0", num_classes=10))
    state["stage1.0.rbr_1x1.conv.weight"] = torch.zeros(48, 24, 1, 1)
    with pytest.raises(ValueError, match="'stage1.0.rbr_1x1.conv.weight' has shape"):
        load_official_state_dict(state)


def test_channel_groups_show_the_coupling():
    for name, (train_groups, plain_groups) in {"A0": (5, 22), "B1": (5, 28)}.items():
        model = create_model(name, num_classes=10).eval()
        x = torch.randn(1, 3, 32, 32)
        coupled = channel_groups(model, x)
        assert len(coupled) == train_groups
        assert len(channel_groups(reparameterize(model), x)) == plain_groups
    # A0's stage3: 14 blocks, each 3x3 and 1x1 conv in one group
    a0_groups = channel_groups(create_model("A0", num_classes=10), torch.randn(1, 3, 32, 32))
    assert sorted(len(g) for g in a0_groups) == [2, 2, 4, 8, 28]


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="valid names: RepVGG-A0"):
        create_model("RepVGG-Z9")
    with pytest.raises(ValueError, match="width_multiplier needs 4"):
        RepVGG([2, 4, 14, 1], [0.75, 0.75, 2.5])
    with pytest.raises(ValueError, match="positive"):
        RepVGG([2, 4, 14, 1], [0.75, 0.75, -1, 2.5])
    with pytest.raises(ValueError, match="groups=5 must divide"):
        RepVGG([2, 4, 14, 1], [0.75, 0.75, 0.75, 2.5], override_groups_map={2: 5})
    with pytest.raises(ValueError, match="num_blocks"):
        RepVGG([2, 4, 14], [0.75, 0.75, 0.75, 2.5])
