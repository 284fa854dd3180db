"""Re-branching a pruned plain RepVGG: exact at the start, exact after training and folding back, saved and loaded
exactly, the same model from the same seed and batches."""

import copy
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, one_line_error, run_cli
from test_model import randomize_bn
from test_pipeline import _wait_for_epoch

from compress.data import build_data
from compress.env import Env
from compress.files import build_model, load_checkpoint, load_model, model_record, save_model
from compress.precision import within_tolerance
from compress.prune import PruneOptions, prune_model
from compress.recipe import DataCfg
from compress.reparam import reparam_stage
from repvgg import LayerSpec, PlainRepVGG, RebranchedRepVGG, RepVGG, RepVGGBlock, insert_bn, rebranch, reparameterize


def assert_exact(reference: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor) -> None:
    """The project's exactness rule: max |logit difference| <= 1e-5 * max(max |logit|, 1), both in eval mode."""
    with torch.no_grad():
        ref, out = reference.eval()(x), model.eval()(x)
    diff, scale = (ref - out).abs().max().item(), ref.abs().max().item()
    assert within_tolerance(diff, scale, 1e-5), f"differs by {diff:.3g} (max |logit| {scale:.3g})"


def calibration_batches(seed: int = 1, size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, size, size, generator=g), torch.randint(10, (16,), generator=g)) for _ in range(2)]


def new_branch_bns(model: RebranchedRepVGG) -> list[torch.nn.BatchNorm2d]:
    return [bn for b in model.blocks() for bn in (b.rbr_1x1.bn, b.rbr_identity) if bn is not None]


@pytest.fixture(scope="module")
def pruned() -> PlainRepVGG:
    """A grouped RepVGG with random BN statistics, re-parameterized and pruned per layer to half its MACs."""
    torch.manual_seed(0)
    model = RepVGG([2, 2, 2, 1], widths=[16, 48, 48, 64, 128], override_groups_map={2: 4, 4: 4}, num_classes=10)
    plain = reparameterize(randomize_bn(model))
    before = plain.widths()
    # the default target, keep_macs 0.5, by global ranking (the planner is not what these tests are about)
    prune_model(plain, PruneOptions(round_to=8, planner="ranking"), torch.randn(1, 3, 32, 32))
    assert plain.widths() != before and any(s.groups == 4 for s in plain.layer_specs())
    return plain.eval()


def test_rebranched_model_equals_the_pruned_plain_model_at_step_0(pruned):
    model = rebranch(pruned, calibration_batches())
    assert isinstance(model, RebranchedRepVGG) and not model.training
    assert model.layer_specs() == pruned.layer_specs()
    assert all(isinstance(b, RepVGGBlock) for b in model.blocks())  # the stem too
    assert torch.equal(model.linear.weight, pruned.linear.weight) and torch.equal(model.linear.bias, pruned.linear.bias)
    for bn in new_branch_bns(model):
        assert not bn.weight.any() and not bn.bias.any()
    assert_exact(pruned, model, torch.randn(4, 3, 32, 32))


def test_fold_back_is_exact_with_random_bn_statistics(pruned):
    model = randomize_bn(rebranch(pruned, calibration_batches()), seed=1)
    folded = reparameterize(model)
    assert isinstance(folded, PlainRepVGG) and folded.layer_specs() == pruned.layer_specs()
    assert_exact(model, folded, torch.randn(4, 3, 32, 32))


def test_identity_branch_only_where_widths_match_at_stride_1():
    specs = [
        LayerSpec(3, 16, 2),
        LayerSpec(16, 48, 1),  # pruned 16 next to 48: no identity
        LayerSpec(48, 48, 1, groups=4),
        LayerSpec(48, 16, 2),
        LayerSpec(16, 16, 2),  # equal widths, stride 2: no identity
        LayerSpec(16, 16, 1),
    ]
    torch.manual_seed(0)
    plain = PlainRepVGG(specs, num_classes=10).eval()
    model = rebranch(plain, calibration_batches())
    assert [b.rbr_identity is not None for b in model.blocks()] == [False, False, True, False, False, True]
    assert all(b.rbr_1x1 is not None for b in model.blocks())
    x = torch.randn(4, 3, 32, 32)
    assert_exact(plain, model, x)
    randomize_bn(model, seed=2)
    assert_exact(model, reparameterize(model), x)


def test_3x3_branch_bn_starts_from_the_statistics_of_its_conv_outputs(pruned):
    """Its running statistics are those of the (bias-free) 3x3 conv outputs on the batches, so in train mode, where
    BN normalises by batch statistics, the model still computes what the plain model does on those batches."""
    batches = calibration_batches()
    model = rebranch(pruned, batches)
    outputs = {b.rbr_dense.conv: [] for b in model.blocks()}
    hooks = [conv.register_forward_hook(lambda conv, _, out: outputs[conv].append(out)) for conv in outputs]
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for h in hooks:
        h.remove()
    for block in model.blocks():
        out = torch.cat(outputs[block.rbr_dense.conv]).transpose(0, 1).flatten(1)
        bn = block.rbr_dense.bn
        torch.testing.assert_close(bn.running_mean, out.mean(1), rtol=1e-4, atol=1e-4)
        # the standardised conv's outputs have variance v / (v + eps) for a plain-conv variance v: 1 but for eps
        torch.testing.assert_close(bn.running_var, out.var(1, unbiased=False), rtol=1e-2, atol=0)
    one_batch = batches[:1]
    model = rebranch(pruned, one_batch).train()
    with torch.no_grad():
        torch.testing.assert_close(model(one_batch[0][0]), pruned(one_batch[0][0]), rtol=1e-3, atol=1e-3)


def test_fold_back_stays_exact_after_training(pruned):
    model = rebranch(pruned, calibration_batches()).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(10, (16,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(bn.weight.abs().sum() > 0 for bn in new_branch_bns(model))  # the new branches now contribute
    folded = reparameterize(model.eval())
    x = torch.randn(4, 3, 32, 32)
    assert_exact(model, folded, x)
    with torch.no_grad():
        assert not torch.allclose(folded(x), pruned(x))  # training moved the model


def test_reparam_stage_folds_a_rebranched_model_and_records_the_difference(tmp_path):
    data = build_data(DataCfg(image_size=16, augment="none", batch_size=64))
    torch.manual_seed(0)
    plain = reparameterize(RepVGG([1, 1, 1, 1], widths=[8, 16, 16, 24, 32], num_classes=data.num_classes).eval())
    model = randomize_bn(rebranch(plain, data.calibration_loader(64)), seed=4)
    folded, metrics = reparam_stage(model, data, Env(device=torch.device("cpu"), out_dir=tmp_path))
    assert isinstance(folded, PlainRepVGG) and folded.layer_specs() == plain.layer_specs()
    assert within_tolerance(metrics["max_abs_diff"], metrics["max_abs_logit"], 1e-5)
    assert "top1" in metrics  # the folded model was evaluated


def test_save_and_load_round_trip_exactly(pruned, tmp_path):
    model = randomize_bn(rebranch(pruned, calibration_batches()), seed=5)
    save_model(model, tmp_path / "rebranched.pt")
    loaded = load_model(tmp_path / "rebranched.pt")
    assert isinstance(loaded, RebranchedRepVGG) and loaded.config() == model.config()
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_loading_is_strict_about_keys_and_shapes(pruned):
    record = model_record(rebranch(pruned, calibration_batches()))
    assert record["arch"] == "rebranch"
    missing = copy.deepcopy(record)
    del missing["state_dict"]["layers.2.rbr_identity.running_var"]
    with pytest.raises(ValueError, match="misses 'layers.2.rbr_identity.running_var'"):
        build_model(missing)
    reshaped = copy.deepcopy(record)
    reshaped["state_dict"]["layers.1.rbr_1x1.conv.weight"] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match="layers.1.rbr_1x1.conv.weight"):
        build_model(reshaped)
    with pytest.raises(ValueError, match="unknown model arch"):
        build_model({**record, "arch": "rebranched"})


def test_same_seed_and_batches_build_bit_identical_models(pruned):
    rng = torch.get_rng_state()
    a = rebranch(pruned, calibration_batches(), seed=7).state_dict()
    b = rebranch(pruned, calibration_batches(), seed=7).state_dict()
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone (data order, dropout, ...)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = rebranch(pruned, calibration_batches(), seed=8).state_dict()
    changed = {k for k in a if not torch.equal(a[k], c[k])}
    assert changed == {k for k in a if k.endswith("rbr_1x1.conv.weight")}


def test_rebranch_refuses_a_model_with_temporary_bns_or_a_multibranch_model(pruned):
    with pytest.raises(ValueError, match="fold_bn"):
        rebranch(insert_bn(copy.deepcopy(pruned), calibration_batches()), calibration_batches())
    with pytest.raises(TypeError, match="PlainRepVGG"):
        rebranch(RepVGG([1, 1, 1, 1], widths=[8, 8, 8, 8, 8], num_classes=10), calibration_batches())


# ---- the pipeline's finetune.structure: rebranch ------------------------------------------------------------------
def test_insert_bn_in_a_recipe_names_its_replacement(tiny_recipe, capsys):
    line = one_line_error(capsys, ["--recipe", str(tiny_recipe(finetune={"insert_bn": True}))])
    assert "finetune.insert_bn: replaced by finetune.structure" in line


def test_rebranch_with_a_multibranch_prune_is_one_line(tiny_recipe, capsys, tmp_path):
    recipe = tiny_recipe(prune={"mode": "multibranch"}, finetune={"structure": "rebranch"})
    assert "prune.mode: multibranch" in one_line_error(capsys, ["--recipe", str(recipe), "--out", str(tmp_path / "x")])


@pytest.mark.slow
def test_rebranch_fine_tune_resumes_after_a_kill_with_identical_weights(tiny_recipe, tmp_path):
    recipe = str(tiny_recipe(stages=["train", "reparam", "prune", "finetune"], train={"epochs": 1},
                             prune={"round_to": 4}, finetune={"epochs": 3, "lr": 0.01, "structure": "rebranch"}))
    full, killed = tmp_path / "full", tmp_path / "killed"
    done = run_cli("--recipe", recipe, "--out", str(full))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Fine-tuned as: rebranch; folded back exactly" in done.stdout
    finetune = json.loads((full / "summary.json").read_text())["stages"]["finetune"]
    assert finetune["structure"] == "rebranch" and within_tolerance(finetune["max_abs_diff"],
                                                                    finetune["max_abs_logit"], 1e-5)
    assert load_model(full / "finetuned.pt").widths() == load_model(full / "pruned.pt").widths()
    proc = subprocess.Popen([sys.executable, str(ROOT / "compress.py"), "--recipe", recipe, "--out", str(killed)],
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_epoch(killed / "finetune.ckpt", 0, proc)  # one re-branched epoch done
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rerun = run_cli("--recipe", recipe, "--out", str(killed))
    assert rerun.returncode == 0 and "[finetune] resuming after epoch" in rerun.stderr, rerun.stderr[-2000:]
    a, b = load_checkpoint(full / "finetuned.pt")["state_dict"], load_checkpoint(killed / "finetuned.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
