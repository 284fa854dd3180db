"""Every artifact belongs to its recipe: keys cover what changes a result (resolved), stale inputs are refused
under --stages and recomputed without it, and one stage registry drives recipe, pipeline and CLI."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY, one_line_error

from compress.cli import main
from compress.files import load_checkpoint
from compress.recipe import load_recipe, validate_recipe
from compress.registry import STAGE_NAMES, STAGES
from compress.rundir import RunDir
from compress.stages import RUNNERS


def _rundir(tmp_path, device="cpu", **sections) -> RunDir:
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return RunDir(tmp_path / "run", validate_recipe(raw).resolved(device))


def _summary(out) -> dict:
    return json.loads((out / "summary.json").read_text())["stages"]


def test_stale_input_under_stages_is_one_line_and_the_rerun_prunes_the_new_model(tiny_recipe, tmp_path, capsys):
    recipe, out = str(tiny_recipe(prune={"round_to": 4})), str(tmp_path / "run")
    assert main(["--recipe", recipe, "--out", out, "--stages", "train,reparam"]) == 0
    # the repro: pruning under a changed train section used to prune the old plain.pt and record the new key
    line = one_line_error(capsys, ["--recipe", recipe, "--out", out, "--stages", "prune", "--set", "train.lr=0.02"])
    assert line == "error: plain.pt was made before train changed: add train, reparam to --stages, or run without --stages"
    assert "prune" not in _summary(tmp_path / "run") and not (tmp_path / "run" / "pruned.pt").exists()
    # train redone alone: now only plain.pt is stale
    assert main(["--recipe", recipe, "--out", out, "--stages", "train", "--set", "train.lr=0.02"]) == 0
    line = one_line_error(capsys, ["--recipe", recipe, "--out", out, "--stages", "train,prune", "--set", "train.lr=0.02"])
    assert line == "error: plain.pt was made before train changed: add reparam to --stages, or run without --stages"
    capsys.readouterr()
    assert main(["--recipe", recipe, "--out", out, "--stages", "train,reparam,prune", "--set", "train.lr=0.02"]) == 0
    err = capsys.readouterr().err
    assert "[train] done earlier, reused" in err and "[reparam] running" in err and "[prune] running" in err
    stages = _summary(tmp_path / "run")
    pruned = load_checkpoint(tmp_path / "run" / "pruned.pt")["provenance"]
    assert pruned["artifact_key"] == stages["prune"]["artifact_key"]
    plain = load_checkpoint(tmp_path / "run" / "plain.pt")["provenance"]
    assert plain["artifact_key"] == stages["reparam"]["artifact_key"] != stages["prune"]["artifact_key"]
    # without --stages a stale stage is recomputed in order, as before
    capsys.readouterr()
    assert main(["--recipe", recipe, "--out", out, "--stages", "train,reparam,prune"]) == 0
    assert "[prune] running" in capsys.readouterr().err


def test_workers_reuse_and_test_subset_reevaluates_without_retraining(tiny_recipe, tmp_path, capsys):
    recipe, out = str(tiny_recipe(stages=["train", "reparam"])), tmp_path / "run"
    assert main(["--recipe", recipe, "--out", str(out)]) == 0
    first = _summary(out)
    weights = load_checkpoint(out / "train.pt")["state_dict"]
    capsys.readouterr()
    assert main(["--recipe", recipe, "--out", str(out), "--set", "data.workers=1"]) == 0
    assert "running" not in capsys.readouterr().err
    assert main(["--recipe", recipe, "--out", str(out), "--set", "data.test_subset=50"]) == 0
    err = capsys.readouterr().err
    assert "[train] running" in err and "[train] epoch" not in err  # re-evaluated from the finished checkpoint
    second = _summary(out)
    assert second["train"]["artifact_key"] == first["train"]["artifact_key"]
    assert second["train"]["key"] != first["train"]["key"]
    assert second["reparam"]["top1"] == second["train"]["top1"]  # both measured on the same 50 images
    again = load_checkpoint(out / "train.pt")["state_dict"]
    assert all(torch.equal(weights[k], again[k]) for k in weights)


def test_round_to_is_resolved_into_the_key(tmp_path):
    # the training's precision and layout fixed: under auto they follow the device too (test_train_device)
    same = {"precision": "fp32", "channels_last": True}
    cpu, cuda = _rundir(tmp_path, "cpu", train=same), _rundir(tmp_path, "cuda", train=same)
    assert (cpu.recipe.prune.round_to, cuda.recipe.prune.round_to) == (16, 8)
    assert cpu.artifact_key("prune") != cuda.artifact_key("prune")
    assert cpu.artifact_key("reparam") == cuda.artifact_key("reparam")
    explicit = _rundir(tmp_path, "cuda", train=same, prune={"round_to": 16})
    assert explicit.artifact_key("prune") == cpu.artifact_key("prune")


def test_iterative_prune_key_covers_finetune_and_skipped_stages_pass_through(tmp_path):
    one = [_rundir(tmp_path, finetune={"lr": lr}) for lr in (0.01, 0.02)]
    assert one[0].artifact_key("prune") == one[1].artifact_key("prune")
    two = [_rundir(tmp_path, prune={"steps": 2}, finetune={"lr": lr}) for lr in (0.01, 0.02)]
    assert two[0].artifact_key("prune") != two[1].artifact_key("prune")
    assert "finetune" in two[0].sections("prune") and "finetune" not in one[0].sections("prune")
    # a recipe that skips finetune: quantize reads the pruned model, and finetune settings change nothing
    stages = ["train", "reparam", "prune", "quantize"]
    skip = [_rundir(tmp_path, stages=stages, finetune={"lr": lr}) for lr in (0.01, 0.02)]
    assert skip[0].source("finetune") == "prune"
    assert skip[0].artifact_key("quantize") == skip[1].artifact_key("quantize")


def test_non_weight_settings_and_resolved_paths_keep_keys(tmp_path, monkeypatch):
    base = _rundir(tmp_path)
    for data in ({"workers": 4}, {"bad_images": "skip"}, {"download": True}):
        assert _rundir(tmp_path, data=data).artifact_key("train") == base.artifact_key("train"), data
    assert _rundir(tmp_path, data={"test_subset": 10}).artifact_key("train") == base.artifact_key("train")
    assert _rundir(tmp_path, data={"test_subset": 10}).key("train") != base.key("train")
    assert _rundir(tmp_path, data={"image_size": 24}).artifact_key("train") != base.artifact_key("train")
    # the same folder named from two working directories: one key
    (tmp_path / "imgs").mkdir()
    monkeypatch.chdir(tmp_path)
    a = _rundir(tmp_path, data={"kind": "imagefolder", "root": "imgs"})
    monkeypatch.chdir(tmp_path / "imgs")
    b = _rundir(tmp_path, data={"kind": "imagefolder", "root": "."})
    assert a.recipe.data.root == b.recipe.data.root == tmp_path / "imgs"
    assert a.artifact_key("train") == b.artifact_key("train")


def test_old_key_scheme_run_dir_is_one_line(tiny_recipe, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"recipe": "tiny", "stages": {"train": {"key": "0123"}}}))
    line = one_line_error(capsys, ["--recipe", str(tiny_recipe()), "--out", str(out)])
    assert "older version" in line and "fresh run directory" in line


def test_stage_outside_the_recipe_is_refused(tiny_recipe, capsys):
    line = one_line_error(capsys, ["--recipe", str(tiny_recipe(stages=["train", "reparam"])), "--stages", "prune"])
    assert "'prune' is not among the recipe's stages" in line


@pytest.mark.slow
def test_one_registry_without_import_cycles():
    for order in ("compress.pipeline, compress.stages", "compress.stages, compress.pipeline"):
        run = subprocess.run([sys.executable, "-c", f"import {order}"], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
    assert STAGE_NAMES == ("train", "reparam", "prune", "finetune", "quantize", "export", "bench")
    assert tuple(RUNNERS) == STAGE_NAMES  # one function per stage, dispatched from the table, in pipeline order
    for name, spec in STAGES.items():
        assert callable(RUNNERS[name]) and RUNNERS[name].__module__ == f"compress.stages.{name}"
        assert spec.input is None or STAGE_NAMES.index(spec.input) < STAGE_NAMES.index(spec.name)
    # the stage list is written out once, in the registry; no stage function is named by a string
    sources = {p: p.read_text() for p in (ROOT / "compress").rglob("*.py")}
    assert [p for p, text in sources.items() if '"reparam", "prune", "finetune"' in text] == []
    assert [p for p, text in sources.items() if '"compress.stages:' in text] == []


def test_algorithms_do_not_read_the_recipe():
    """Torch-Pruning's way: the pruner, the benchmark and the runtimes take typed options; only stages read recipes."""
    for package in ("prune", "bench", "runtime"):
        for path in (ROOT / "compress" / package).rglob("*.py"):
            text = path.read_text()
            assert "compress.recipe" not in text and "from ..recipe" not in text, path


@pytest.mark.parametrize("mode,ranks", [("qat", True), ("ptq", False)])
def test_registry_ranks_follow_the_recipe(tmp_path, mode, ranks):
    rundir = _rundir(tmp_path, quantize={"mode": mode}, prune={"steps": 2})
    assert rundir.trains("quantize") is ranks
    assert rundir.trains("prune") and rundir.sections_read("prune") == ("prune", "finetune")
    single = _rundir(tmp_path)
    assert not single.trains("prune") and single.sections_read("prune") == ("prune",)
    assert single.trains("train") and not single.trains("export")


def test_keys_of_a_run_made_before_the_restructure_are_unchanged(tmp_path):
    """A quickstart run directory made before the stages became a package (71d0a0e): every section hash its
    summary.json recorded is what the recipe gives now, except those changed on purpose since. The training
    sections name the precision and memory layout they ran at (`precision`, `channels_last`, resolved to this
    machine, in place of `amp`), with `compile` and `ema_decay`; the prune stage plans within the MAC budget and
    re-fits the pruned layers (`prune.planner`, `prune.reconstruct`); `quantize.target_device` (resolved to this
    machine) and the overflow fix it calls for are part of what an INT8 artifact is made from; a `bn` fine-tune's
    keys name its temporary BNs' initialisation since it changed."""
    before = json.loads((ROOT / "tests" / "data" / "quickstart_keys_before_restructure.json").read_text())
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml").resolved("cpu")
    run_dir = RunDir(tmp_path / "run", recipe)
    assert before["key_scheme"] == run_dir.summary["key_scheme"]
    assert list(before["stages"]) == list(recipe.stages)
    for stage, changed_on_purpose in (("train", ["train"]), ("reparam", ["train"]), ("prune", ["prune", "train"]),
                                      ("finetune", ["finetune", "prune", "train"]),
                                      ("quantize", ["finetune", "prune", "quantize", "train"])):
        recorded = before["stages"][stage]["sections"]
        now = run_dir.provenance(stage)["sections"]
        assert list(now) == list(recorded), stage
        changed = [k for k, v in now.items() if v != recorded[k]]
        assert sorted(changed) == changed_on_purpose, stage
    for section in (recipe.train, recipe.finetune, recipe.quantize):
        values = section.key_values()
        assert "amp" not in values and values["precision"] in ("fp32", "bf16") and values["channels_last"] in (True, False)
    assert {"planner", "reconstruct"} <= set(recipe.prune.key_values())
    assert "sensitivity_images" not in recipe.prune.key_values()  # taylor does not read it
    assert {"target_device", "overflow_fix"} <= set(recipe.quantize.key_values())
    # the temporary BNs of a bn fine-tune start another way now: bn and rebranch fine-tunes say so
    assert recipe.finetune.structure == "bn" and recipe.finetune.key_values()["bn_init"] == "conv_over_root_std"
    assert "bn_init" in recipe.finetune.model_copy(update={"structure": "rebranch"}).key_values()
    assert "bn_init" not in recipe.finetune.model_copy(update={"structure": "plain"}).key_values()
