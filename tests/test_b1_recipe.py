"""Starting from pretrained weights: the B1 recipe end to end from a timm-layout checkpoint, and the one-line
errors of model.pretrained / model.checkpoint."""

import json
import os
import sys

import pytest
import torch
from conftest import ROOT, one_line_error, run_cli

from compress.cli import main
from compress.recipe import RecipeError, load_recipe


def _image_folder(root, size=72, classes=2, per_class=8):
    from PIL import Image

    for split in ("train", "val"):
        for c in range(classes):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (size, size), (c * 200, i * 25, 60)).save(root / split / f"class{c}" / f"{i}.png")
    return root


@pytest.mark.slow
def test_b1_prune50_recipe_end_to_end_from_a_timm_checkpoint(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    checkpoint = tmp_path / "repvgg_b1.pth"
    torch.save(timm.create_model("repvgg_b1", pretrained=False).state_dict(), checkpoint)
    data = _image_folder(tmp_path / "imgs")
    out = tmp_path / "run"
    proc = run_cli(
        "--recipe", str(ROOT / "recipes" / "b1_prune50.yaml"), "--out", str(out),
        "--set", f"data.root={data}", "--set", "model.pretrained=null", "--set", f"model.checkpoint={checkpoint}",
        "--set", "data.image_size=64", "--set", "data.batch_size=8", "--set", "data.workers=0",
        "--set", "finetune.epochs=1", "--set", "quantize.mode=ptq", "--set", "quantize.calibration_size=8",
        "--set", "prune.gradient_batches=1",
        "--set", "prune.reconstruct=false",  # B1's 4,608-input layers: float64 normal equations, a minute on 2 cores
        "--set", "bench.batch_sizes=[8]", "--set", "bench.rounds=1", "--set", "bench.warmup=1",
        "--set", "bench.iters=2", "--set", "bench.providers=[cpu]",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: the new 2-class head is untrained (train.epochs: 0)" in proc.stderr
    stages = json.loads((out / "summary.json").read_text())["stages"]
    assert stages["train"]["epochs"] == 0 and stages["train"]["start"] == {"checkpoint": str(checkpoint)}
    assert abs(stages["prune"]["keep_macs_achieved"] - 0.5) <= 0.02 and len(stages["prune"]["widths_after"]) == 28
    assert set(stages["export"]["artifacts"]) == {"train_fp32", "plain_fp32", "plain_int8", "pruned_fp32",
                                                  "pruned_int8"}
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| artifact | top-1 % |") and "ORT CPU fastest call ms @8" in table[0]
    assert {line.split("|")[1].strip() for line in table[1:6]} == set(stages["export"]["artifacts"])
    assert (out / "report.md").read_text() in proc.stdout


def test_export_eval_subset_evaluates_a_stratified_sample_and_records_it(tiny_recipe, tmp_path):
    out = tmp_path / "run"
    recipe = tiny_recipe(stages=["train", "reparam", "export"], export={"eval_subset": 40})
    assert main(["--recipe", str(recipe), "--out", str(out)]) == 0
    export = json.loads((out / "summary.json").read_text())["stages"]["export"]
    assert {a["n"] for a in export["artifacts"].values()} == {40}
    assert export["test_images"]["images"] == 40 and len(export["test_images"]["sha256"]) == 16
    # a new subset re-evaluates the files; the trained model is reused
    assert main(["--recipe", str(recipe), "--out", str(out), "--set", "export.eval_subset=60"]) == 0
    stages = json.loads((out / "summary.json").read_text())["stages"]
    assert {a["n"] for a in stages["export"]["artifacts"].values()} == {60} and stages["train"]["epochs"] == 2


def _a0_recipe(tiny_recipe, **model):
    return str(tiny_recipe(stages=["train"], model={"name": "RepVGG-A0", "num_blocks": None, "width_multiplier": None,
                                                    "stem_stride": 2, **model}))


def test_pretrained_and_checkpoint_together_is_one_line(tiny_recipe, tmp_path):
    with pytest.raises(RecipeError, match="model: give pretrained or checkpoint, not both"):
        load_recipe(_a0_recipe(tiny_recipe, pretrained="timm", checkpoint=str(tmp_path / "x.pth")))


def test_pretrained_without_timm_says_what_to_install(tiny_recipe, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` fails as without the [timm] extra, installed or not
    line = one_line_error(capsys, ["--recipe", _a0_recipe(tiny_recipe, pretrained="timm")])
    assert line == ("error: model.pretrained: timm needs the timm package: pip install 'repvgg-compress[timm]', "
                    "or pass model.checkpoint: FILE (.pth or .safetensors)")


def test_pretrained_offline_is_one_line(tiny_recipe, tmp_path):
    pytest.importorskip("timm")  # without it, the error above
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty cache, no network
    proc = run_cli("--recipe", _a0_recipe(tiny_recipe, pretrained="timm"), "--out", str(tmp_path / "run"), env=env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(errors) == 1 and "could not load pretrained repvgg_a0" in errors[0], errors


def test_deploy_form_checkpoint_with_training_is_one_line(tiny_recipe, tmp_path, capsys):
    timm = pytest.importorskip("timm")
    from timm.models import reparameterize_model

    checkpoint = tmp_path / "a0_deploy.pth"
    torch.save(reparameterize_model(timm.create_model("repvgg_a0", pretrained=False).eval()).state_dict(), checkpoint)
    line = one_line_error(capsys, ["--recipe", _a0_recipe(tiny_recipe, checkpoint=str(checkpoint)),
                                   "--out", str(tmp_path / "run")])
    assert "deploy-form" in line and "train.epochs: 0" in line
