"""benchmarks/gpu_check.sh rehearsed on the CPU (GPU_CHECK_DEVICE=cpu): every check runs and prints its line, with
nncf unimportable as on the GPU machine; and its skip / fail logic, with modules hidden."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

# a short quickstart: the rehearsal checks the script's logic, not the model
SHORT = ["--set", "train.epochs=1", "--set", "finetune.epochs=1", "--set", "data.train_subset=256",
         "--set", "data.test_subset=128"]


def run_script(tmp_path: Path, *args: str, **env: str) -> tuple[int, list[str]]:
    environ = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path / "work"), **env}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args], cwd=tmp_path, env=environ,
                          capture_output=True, text=True, timeout=240)
    return proc.returncode, proc.stdout.splitlines()


def check_lines(lines: list[str]) -> dict[str, str]:
    """{'a' | 'b' | 'c': what follows the check's label}."""
    return {line[1]: line.split(": ", 1)[1] for line in lines if line[:1] == "("}


@pytest.mark.slow
def test_rehearsal_runs_every_check_without_nncf(tmp_path):
    rc, lines = run_script(tmp_path, *SHORT, GPU_CHECK_DEVICE="cpu", GPU_CHECK_HIDE="nncf")
    checks = check_lines(lines)
    assert rc == 0, lines
    assert set(checks) == {"a", "b", "c"} and all(v.startswith("ok: ") for v in checks.values()), lines
    assert "float32 conv outputs, contiguous input" in checks["a"]  # fit keeps AMP and channels_last to CUDA
    assert "train,reparam,prune,finetune" in checks["b"] and "max_abs_diff" in checks["b"]
    assert "pruned/plain" in checks["c"] and "[torch eager, input on cpu]" in checks["c"]
    run = tmp_path / "work" / "quickstart"
    summary = json.loads((run / "summary.json").read_text())["stages"]
    assert f"max_abs_diff {summary['reparam']['max_abs_diff']:.3g}" in checks["b"]
    latency = json.loads((run / "torch_latency.json").read_text())
    assert {(r["artifact"], r["batch"]) for r in latency["results"]} == {(m, b) for m in ("plain", "pruned")
                                                                         for b in (1, 64)}
    assert lines[-1] == "gpu_check: all checks passed or skipped"


def test_hidden_modules_are_hidden_in_compress_py_too(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import sys\ntry:\n    import nncf\nexcept ImportError:\n    print('hidden', sys.argv[1:])\n")
    out = subprocess.run([sys.executable, "-c", gpu_check.RUN_COMPRESS, str(probe), "--x"], capture_output=True,
                         text=True, env={**os.environ, "GPU_CHECK_HIDE": "nncf"}, timeout=60)
    assert out.stdout.strip() == "hidden ['--x']"


def test_missing_package_skips_every_check_that_needs_it(tmp_path):
    rc, lines = run_script(tmp_path, GPU_CHECK_DEVICE="cpu", GPU_CHECK_HIDE="pydantic")
    checks = check_lines(lines)
    # training reads a recipe section (pydantic); the latency check does not, and has nothing to time without (b)
    assert rc == 0 and checks["a"] == checks["b"] == "skipped: needs pydantic, which is not installed"
    assert checks["c"] == "skipped: no plain.pt or finetuned.pt: check (b) made none"


def test_a_missing_project_module_fails_instead_of_skipping(monkeypatch):
    assert gpu_check.missing("json", "compress.bench") is None
    assert gpu_check.missing("no_such_package_xyz") == "needs no_such_package_xyz, which is not installed"
    monkeypatch.setitem(sys.modules, "compress.train", None)  # as if the checkout lacked it
    with pytest.raises(gpu_check.Fail, match="the checkout is broken"):
        gpu_check.missing("compress.train")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the lines printed where CUDA is absent")
def test_without_cuda_every_check_says_skipped(tmp_path):
    rc, lines = run_script(tmp_path)
    checks = check_lines(lines)
    assert rc == 0 and set(checks) == {"a", "b", "c"}
    assert all(v.startswith("skipped: no CUDA device here") for v in checks.values())
