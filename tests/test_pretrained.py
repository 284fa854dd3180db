"""Pretrained weights: timm's repvgg_* state dicts (training-time and deployed) and the official release's
files, read as state dicts, .pth or .safetensors, become our models with the same logits."""

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from test_model import assert_equivalent, official_layout_state_dict, randomize_bn, small_groupwise

from compress.files import CheckpointError, load_model
from repvgg import CONFIGS, PlainRepVGG, RepVGG, from_state_dict, reparameterize
from repvgg.model import stage_widths

timm = pytest.importorskip("timm")
from timm.models import reparameterize_model  # noqa: E402
from timm.models.byobnet import ByobNet, ByoModelCfg, _rep_vgg_bcfg  # noqa: E402


def timm_model(name: str) -> torch.nn.Module:
    """Random init (no download), with BN statistics and affine parameters randomised so that a loader that
    drops or swaps any BN tensor changes the logits."""
    return randomize_bn(timm.create_model(name, pretrained=False, num_classes=10))


def toy_timm_repvgg(**block_options) -> torch.nn.Module:
    """timm's RepVGG (ByobNet of RepVggBlocks, `rep` stem) at one block per stage and quarter widths."""
    cfg = ByoModelCfg(
        blocks=_rep_vgg_bcfg(d=(1, 1, 1, 1), wf=(0.25, 0.25, 0.25, 0.25)), stem_type="rep", stem_chs=16, **block_options
    )
    return randomize_bn(ByobNet(cfg, num_classes=10))


def refusal(error: type[Exception], load, source) -> str:
    """The message of the `error` that `load(source)` raises, which must be one line."""
    with pytest.raises(error) as excinfo:
        load(source)
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("name,ours", [("repvgg_a0", "A0"), ("repvgg_b1g4", "B1g4"), ("repvgg_b2", "B2")])
def test_timm_training_and_deployed_state_dicts_give_timms_logits(name, ours):
    reference = timm_model(name)
    x = torch.randn(1, 3, 32, 32)
    model = from_state_dict(reference.state_dict()).eval()
    assert isinstance(model, RepVGG)
    num_blocks, multiplier, groups = CONFIGS[f"RepVGG-{ours}"]  # depth, widths and groups inferred from shapes
    assert model.num_blocks == list(num_blocks[1:]) and model.override_groups_map == (groups or {})
    assert model.config()["widths"] == stage_widths(multiplier)
    assert_equivalent(reference, model, x)
    plain = reparameterize(model)
    assert_equivalent(reference, plain, x)

    deployed = reparameterize_model(reference, inplace=True)  # timm's own fusion: `reparam_conv` keys
    assert any(key.endswith("reparam_conv.weight") for key in deployed.state_dict())
    loaded_plain = from_state_dict(deployed.state_dict())
    assert isinstance(loaded_plain, PlainRepVGG) and loaded_plain.layer_specs() == plain.layer_specs()
    assert_equivalent(deployed, loaded_plain.eval(), x)


def test_stem_stride_is_the_callers():
    state = toy_timm_repvgg().state_dict()
    assert from_state_dict(state).stem_stride == 2
    model = from_state_dict(state, stem_stride=1)
    assert model.stem_stride == 1 and model.stage0(torch.zeros(1, 3, 32, 32)).shape[-1] == 32


def test_official_layout_pth_file_loads(tmp_path):
    reference = randomize_bn(small_groupwise())
    path = tmp_path / "official.pth"
    torch.save(official_layout_state_dict(reference, prefix="module."), path)
    model = from_state_dict(path).eval()
    assert isinstance(model, RepVGG) and model.override_groups_map == {2: 2, 4: 4}
    assert_equivalent(reference, model, torch.randn(2, 3, 32, 32))


def test_timm_files_load_as_recipe_checkpoints(tmp_path):
    reference = toy_timm_repvgg()
    safetensors_path, pth_path = tmp_path / "model.safetensors", tmp_path / "checkpoint.pth"
    save_file(reference.state_dict(), safetensors_path)  # the hub's file format
    torch.save({"epoch": 3, "state_dict": reference.state_dict()}, pth_path)  # timm's train.py checkpoint layout
    for path in (safetensors_path, pth_path):
        # load_model is what `model.checkpoint` in a recipe runs
        assert_equivalent(reference, load_model(path).eval(), torch.randn(1, 3, 32, 32))


def test_squeeze_excitation_variants_are_refused_in_one_line():
    d2se_like = toy_timm_repvgg(attn_layer="se", attn_kwargs=dict(rd_ratio=0.0625, rd_divisor=1))  # repvgg_d2se's SE
    official = official_layout_state_dict(small_groupwise())
    official["stage1.0.se.down.weight"] = torch.zeros(4, 16, 1, 1)  # the release's SEBlock
    for state in (d2se_like.state_dict(), official):
        assert "not supported" in refusal(ValueError, from_state_dict, state)


def test_non_repvgg_state_dicts_are_refused_in_one_line():
    resnet = torchvision.models.resnet18(num_classes=10).state_dict()
    assert "is not a RepVGG key" in refusal(ValueError, from_state_dict, resnet)
    # timm's MobileOne shares RepVGG's ByobNet names but has several 3x3 branches per block
    mobileone = timm.create_model("mobileone_s0", pretrained=False, num_classes=10).state_dict()
    assert "is not a timm RepVGG key" in refusal(ValueError, from_state_dict, mobileone)
    assert "not a state dict" in refusal(TypeError, from_state_dict, [torch.zeros(1)])


def test_missing_and_damaged_files_are_refused_in_one_line(tmp_path):
    assert "not found" in refusal(FileNotFoundError, from_state_dict, tmp_path / "missing.pth")
    assert "not found" in refusal(CheckpointError, load_model, tmp_path / "missing.safetensors")
    damaged = tmp_path / "damaged.safetensors"
    save_file({"stage0.rbr_reparam.weight": torch.zeros(8, 3, 3, 3)}, damaged)
    damaged.write_bytes(damaged.read_bytes()[:40])
    assert "cannot be read as a safetensors file" in refusal(ValueError, from_state_dict, damaged)
    assert "cannot be read" in refusal(CheckpointError, load_model, damaged)
