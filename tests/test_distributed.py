"""torchrun on CPU (gloo, 2 processes): ranks waiting on rank 0 outlive the training group's timeout, and the
study runs with every rank training and rank 0 alone benchmarking."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

# Runs the CLI with the reparam stage slowed on purpose: rank 0 runs it alone while rank 1 waits.
SLOW_REPARAM = """
import sys, time
sys.path.insert(0, {root!r})
from compress.cli import main
from compress.stages import RUNNERS

reparam = RUNNERS["reparam"]

def slow_reparam(context):
    time.sleep({seconds})
    return reparam(context)

RUNNERS["reparam"] = slow_reparam
sys.exit(main(sys.argv[1:]))
"""


def torchrun(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_ranks_wait_for_a_slow_rank0_stage_past_the_training_timeout(tiny_recipe, tmp_path):
    script = tmp_path / "slow.py"
    script.write_text(SLOW_REPARAM.format(root=str(ROOT), seconds=12))
    recipe = str(tiny_recipe(stages=["train", "reparam"], train={"epochs": 1}, data={"batch_size": 32}))
    args = ["--recipe", recipe, "--set", "distributed.timeout_s=6"]
    proc = torchrun(str(script), *args, "--out", str(tmp_path / "ok"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "ok" / "summary.json").read_text())["stages"]["reparam"]["top1"] > 20
    # the wait group's own timeout is what bounds the wait: shorter than the stage, the waiting rank gives up
    proc = torchrun(str(script), *args, "--set", "distributed.wait_timeout_s=6", "--out", str(tmp_path / "short"))
    assert proc.returncode != 0


@pytest.mark.slow
def test_two_process_study(tiny_recipe, tmp_path):
    recipe = str(tiny_recipe(
        train={"epochs": 1, "lr": 0.05},
        data={"batch_size": 32},
        prune={"round_to": 4},
        finetune={"epochs": 1, "lr": 0.01},
        quantize={"mode": "ptq", "calibration_size": 32},
        bench={"batch_sizes": [4], "warmup": 1, "iters": 3, "rounds": 1},
        study={"keep_macs": [0.5], "strategies": ["plain"]},
    ))
    out = tmp_path / "study"
    proc = torchrun(str(ROOT / "compress.py"), "--recipe", recipe, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("# Study: ") == 1  # rank 0 alone reports
    result = json.loads((out / "study.json").read_text())
    assert [r["strategy"] for r in result["rows"]] == ["unpruned", "plain"]
    assert all(r["fp32_ms"]["4"] > 0 and r["int8_ms"]["4"] > 0 for r in result["rows"])
    base = json.loads((out / "base" / "summary.json").read_text())["stages"]
    point = json.loads((out / "points" / "plain_0.5" / "summary.json").read_text())["stages"]
    assert point["train"]["artifact_key"] == base["train"]["artifact_key"]  # seeded once, from the base
    assert "finetune" in point and point["quantize"]["mode"] == "ptq"
