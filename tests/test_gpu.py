"""On a CUDA machine: the pipeline trains under AMP + channels_last, the re-param check holds under the default
TF32, and the pruned model fine-tunes (skipped where there is no CUDA; `benchmarks/gpu_check.sh` is the fuller
check)."""

import json

import pytest

from compress.cli import main


@pytest.mark.gpu
@pytest.mark.slow
def test_tiny_pipeline_through_finetune_on_cuda(tiny_recipe, tmp_path):
    recipe = tiny_recipe(device="cuda", stages=["train", "reparam", "prune", "finetune"], train={"epochs": 2},
                         finetune={"epochs": 1})
    out = tmp_path / "run"
    assert main(["--recipe", str(recipe), "--out", str(out)]) == 0
    stages = json.loads((out / "summary.json").read_text())["stages"]
    assert stages["reparam"]["max_abs_diff"] <= 1e-5 * max(1.0, stages["reparam"]["max_abs_logit"])
    assert stages["prune"]["round_to"] == 8  # the CUDA default
    assert stages["finetune"]["top1"] > 50
