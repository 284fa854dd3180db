import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, one_line_error, run_cli

from compress.cli import main
from compress.files import load_checkpoint, load_model
from compress.recipe import RecipeError, load_recipe
from compress.timing import ratio_of_rounds

# The shipped recipes that need a user's data path, and the override that gives it.
NEEDS_ROOT = {name: ["data.root=/data/imagenet"] for name in ("b1_prune50", "b1_scratch_prune50")}


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_validate(path):
    overrides = NEEDS_ROOT.get(path.stem, [])
    if overrides:
        with pytest.raises(RecipeError, match="data.root"):
            load_recipe(path)
    recipe = load_recipe(path, overrides)
    assert recipe.name == path.stem


def test_train_and_reparam_end_to_end(tiny_recipe, tmp_path):
    out = tmp_path / "run"
    assert main(["--recipe", str(tiny_recipe(stages=["train", "reparam"])), "--out", str(out)]) == 0
    stages = json.loads((out / "summary.json").read_text())["stages"]
    assert stages["train"]["top1"] > 30  # 2 epochs of a tiny model on digits: far above 10% chance
    assert stages["reparam"]["top1"] == stages["train"]["top1"]  # plain twin: identical predictions
    assert stages["reparam"]["max_abs_diff"] <= 1e-5 * stages["reparam"]["max_abs_logit"]
    assert load_model(out / "plain.pt").__class__.__name__ == "PlainRepVGG"
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    # a rerun reuses both finished stages
    before = (out / "plain.pt").stat().st_mtime_ns
    assert main(["--recipe", str(tiny_recipe(stages=["train", "reparam"])), "--out", str(out)]) == 0
    assert (out / "plain.pt").stat().st_mtime_ns == before


def test_dry_run_prints_plan(tiny_recipe, capsys):
    assert main(["--recipe", str(tiny_recipe()), "--dry-run", "--stages", "reparam,train"]) == 0
    assert "plan: train -> reparam" in capsys.readouterr().out


def _wait_for_epoch(path, epoch, proc, limit=120):
    deadline = time.time() + limit
    while time.time() < deadline:
        if path.exists():
            try:
                if load_checkpoint(path)["epoch"] >= epoch:
                    return
            except Exception:
                pass  # being replaced right now
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_with_identical_weights(tiny_recipe, tmp_path):
    recipe = str(tiny_recipe(stages=["train"], train={"epochs": 4, "lr": 0.05}))
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert run_cli("--recipe", recipe, "--out", str(full)).returncode == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "compress.py"), "--recipe", recipe, "--out", str(killed)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_epoch(killed / "train.ckpt", 1, proc)  # epoch index 1: two epochs completed
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "train.pt").exists()
    rerun = run_cli("--recipe", recipe, "--out", str(killed))
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming after epoch" in rerun.stderr
    a, b = load_checkpoint(full / "train.pt")["state_dict"], load_checkpoint(killed / "train.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tiny_recipe, tmp_path):
    out = tmp_path / "ddp"
    # QAT trains under DDP too: every rank calibrates NNCF's quantizers on the same images, then trains; so does
    # the fine-tune between iterative pruning steps, every rank pruning the same way and re-branching the same
    recipe = str(tiny_recipe(stages=["train", "reparam", "prune", "finetune", "quantize"], data={"batch_size": 32},
                             prune={"steps": 2, "steps_finetune_epochs": 1, "round_to": 4},
                             finetune={"structure": "rebranch", "epochs": 1, "lr": 0.01},
                             quantize={"mode": "qat", "epochs": 1, "calibration_size": 64}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
         str(ROOT / "compress.py"), "--recipe", recipe, "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = json.loads((out / "summary.json").read_text())["stages"]
    assert stages["train"]["top1"] > 20 and stages["reparam"]["top1"] == stages["train"]["top1"]
    assert stages["prune"]["keep_macs_achieved"] < 0.6 and (out / "pruned.pt").exists()
    assert proc.stderr.count("[prune_step0] epoch 1/1") == 1  # both ranks fine-tune between steps, rank 0 reports
    assert stages["finetune"]["structure"] == "rebranch" and proc.stderr.count("[finetune] epoch 1/1") == 1
    assert stages["finetune"]["max_abs_diff"] <= 1e-5 * max(stages["finetune"]["max_abs_logit"], 1)  # folded back
    assert stages["quantize"]["mode"] == "qat" and stages["quantize"]["top1"] > 20
    assert stages["quantize"]["source"] == "finetune"
    assert proc.stderr.count("[qat] epoch 1/1") == 1  # both ranks train (DDP), rank 0 reports
    assert (out / "quantized.pt").exists()
    assert len(list((out / "tb").glob("events.out.tfevents*"))) == 1  # only rank 0 writes


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["train.epochz=3"], "train.epochz"),
        (["train.lr=fast"], "train.lr"),
        (["data.kind=imagefolder", "data.root=/no/such/dir"], "/no/such/dir"),
        (["model.name=RepVGG-Z1", "model.num_blocks=null", "model.width_multiplier=null"], "RepVGG-Z1"),
        (["stages=[train,distill]"], "distill"),
        (["bench.rounds=5", "bench.max_rounds=3"], "bench.max_rounds=3"),
    ],
)
def test_bad_recipe_is_one_line(tiny_recipe, capsys, tmp_path, overrides, needle):
    argv = ["--recipe", str(tiny_recipe()), "--out", str(tmp_path / "x")]
    for o in overrides:
        argv += ["--set", o]
    assert needle in one_line_error(capsys, argv)


def test_empty_class_folder_is_one_line(tiny_recipe, capsys, tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            if not (split == "train" and cls == "dog"):
                Image.new("RGB", (8, 8)).save(root / split / cls / "0.png")
    argv = ["--recipe", str(tiny_recipe()), "--out", str(tmp_path / "x"),
            "--set", "data.kind=imagefolder", "--set", f"data.root={root}"]
    assert "dog" in one_line_error(capsys, argv)


def test_missing_recipe_file_is_one_line(capsys, tmp_path):
    assert "nope.yaml" in one_line_error(capsys, ["--recipe", str(tmp_path / "nope.yaml")])


@pytest.mark.slow
def test_every_stage_fills_summary_and_tensorboard(tiny_recipe, tmp_path, capsys):
    out = tmp_path / "full"
    recipe = tiny_recipe(
        model={"num_blocks": [1, 2, 2, 1]},
        prune={"keep_macs": 0.5, "round_to": 4},
        finetune={"epochs": 1, "lr": 0.01, "distill": {"alpha": 0.5, "temperature": 4.0}},
        quantize={"mode": "ptq", "calibration_size": 64},
        bench={"batch_sizes": [1, 4], "warmup": 1, "iters": 3, "rounds": 2},
    )
    assert main(["--recipe", str(recipe), "--out", str(out)]) == 0
    stages = json.loads((out / "summary.json").read_text())["stages"]
    prune = stages["prune"]
    assert prune["macs_after"] < prune["macs_before"] and prune["params_after"] < prune["params_before"]
    assert abs(prune["macs_after"] / prune["macs_before"] - 0.5) <= 0.02
    assert len(prune["widths_before"]) == len(prune["widths_after"]) == 7 and prune["groups"] == 7
    artifacts = stages["export"]["artifacts"]
    assert set(artifacts) == {"train_fp32", "plain_fp32", "plain_int8", "pruned_fp32", "pruned_int8"}
    assert artifacts["plain_int8"]["macs"] == artifacts["plain_fp32"]["macs"] > artifacts["pruned_int8"]["macs"]
    for name, a in artifacts.items():
        assert a["size_bytes"] > 1000 and 0 <= a["top1"] <= 100
        assert name.endswith("int8") or a["max_abs_diff"] <= 1e-4 * max(a["max_abs_logit"], 1)
    results = stages["bench"]["results"]
    assert {(r["artifact"], r["batch"]) for r in results if r["provider"] == "cpu"} == {
        (a, b) for a in artifacts for b in (1, 4)}
    assert {r["artifact"] for r in results if r["provider"] == "torch"} == {"train_fp32", "plain_fp32", "pruned_fp32"}
    for r in results:  # the latency is the fastest call; the median and p90 are recorded beside it
        assert r["fastest_ms"] == min(r["round_fastest_ms"]) and r["fastest_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["images_per_s"] == pytest.approx(r["batch"] * 1000 / r["fastest_ms"])
    # each INT8 file's speed-up over its FP32 twin: the median of same-round ratios of fastest calls
    rounds = {r["artifact"]: r["round_fastest_ms"] for r in results if (r["provider"], r["batch"]) == ("cpu", 1)}
    for name in ("plain", "pruned"):
        assert stages["bench"]["int8_speedup"][f"{name}_int8@cpu"] == ratio_of_rounds(rounds[f"{name}_fp32"],
                                                                                      rounds[f"{name}_int8"])
    assert [p["name"] for p in stages["bench"]["curve"]] == list(artifacts)
    # the run ends with the result table, also in report.md: one row per file, with its measured numbers
    printed = capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert report in printed
    for name, a in artifacts.items():
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1]) == round(a["top1"], 2) and float(cells[3]) == round(a["macs"] / 1e6, 1)
        assert int(cells[2]) == a["n"] and float(cells[6]) > 0  # images evaluated; ORT CPU latency at batch 1
        assert cells[7] == "1.00" if name == "plain_fp32" else float(cells[7]) > 0  # speed-up over plain FP32
        assert cells[-2] in ("ORT CPU", "PyTorch")  # the runtime with the lowest median for this file
        # the stem's share of each INT8 file's time (ORT CPU profile); the FP32 files have none
        assert (0 < float(cells[-1].rstrip("%")) < 100) if name.endswith("int8") else cells[-1] == "-"
    assert set(stages["bench"]["stem_share"]) == {"plain_int8", "pruned_int8"}
    assert "tensorboard --logdir" in report and str(out / "onnx") in report

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars, images = events.Tags()["scalars"], events.Tags()["images"]
    assert {"train/top1", "train/test_loss", "train/lr", "finetune/top1", "prune/top1_before_finetune",
            "prune/top1_after_finetune"} <= set(scalars)  # pruned, then fine-tuned: two tags
    assert {"bench/latency_ms/pruned_int8_ort_cpu_b4", "bench/latency_ms/pruned_fp32_torch_cpu_b1"} <= set(scalars)
    assert {"prune/widths", "bench/accuracy_latency"} <= set(images)
    entry = EventAccumulator(str(out / "tb" / "hparams" / "pruned_int8_ort_cpu_b1"), size_guidance={"scalars": 0})
    entry.Reload()
    assert "accuracy_vs_latency/ort_cpu_b1_int8" in entry.Tags()["scalars"]  # the file's dot, in its entry's run


def test_iterative_pruning_fine_tunes_between_steps(tiny_recipe, tmp_path):
    out = tmp_path / "steps"
    recipe = tiny_recipe(model={"num_blocks": [1, 2, 2, 1]}, stages=["train", "reparam", "prune"],
                         train={"epochs": 1, "lr": 0.05},
                         prune={"keep_macs": 0.5, "round_to": 4, "steps": 2, "steps_finetune_epochs": 1})
    assert main(["--recipe", str(recipe), "--out", str(out)]) == 0
    prune = json.loads((out / "summary.json").read_text())["stages"]["prune"]
    assert abs(prune["macs_after"] / prune["macs_before"] - 0.5) <= 0.02
    step = load_checkpoint(out / "prune_step0.ckpt")  # the fine-tune between step 1 and step 2 ran and saved
    assert step["epoch"] == 0 and any(".bn.running_var" in k for k in step["model"])  # trained with temporary BN
    pruned = load_model(out / "pruned.pt")  # strict rebuild: the BN was folded away before saving
    assert pruned.widths() == prune["widths_after"]


def test_digits_qat_int8_stays_within_2_points_of_fp32_and_passes_its_parity_check(tiny_recipe, tmp_path, capsys):
    out = tmp_path / "qat"
    recipe = tiny_recipe(stages=["train", "reparam", "quantize", "export"], train={"epochs": 3, "lr": 0.05},
                         quantize={"mode": "qat", "epochs": 1, "lr": 1e-4, "calibration_size": 256})
    assert main(["--recipe", str(recipe), "--out", str(out)]) == 0
    stages = json.loads((out / "summary.json").read_text())["stages"]
    fp32, int8 = stages["export"]["artifacts"]["plain_fp32"], stages["export"]["artifacts"]["plain_int8"]
    assert fp32["top1"] > 70 and abs(int8["top1"] - fp32["top1"]) <= 2.0, (fp32["top1"], int8["top1"])
    assert stages["quantize"]["target_device"] in ("cpu-vnni", "cpu-avx2") and "ptq_top1" in stages["quantize"]
    parity = int8["int8_parity"]["cpu"]
    assert parity["agreement"] >= 0.99 and parity["n"] == min(512, int8["n"])
    assert int8["target_device"] == stages["quantize"]["target_device"]
    report = (out / "report.md").read_text()
    assert "INT8 parity" in report and f"INT8 for {int8['target_device']}" in report


def test_a_vnni_target_on_a_cpu_without_vnni_warns_at_export_and_bench(tiny_recipe, tmp_path, capsys, monkeypatch):
    from compress import deploy

    monkeypatch.setattr(deploy, "cpu_flags", lambda: ["avx2", "fma"])  # this CPU, as an AVX2-only one
    recipe = tiny_recipe(stages=["train", "reparam", "quantize", "export", "bench"], train={"epochs": 1},
                         quantize={"mode": "ptq", "calibration_size": 64, "target_device": "cpu-vnni"},
                         # a VNNI-targeted file on a CPU without VNNI may saturate, as the warning says: the check
                         # of its agreement with the fake-quant model is not what this test is about
                         export={"artifacts": ["plain_int8"], "int8_agreement": 0.5},
                         bench={"batch_sizes": [2], "warmup": 1, "iters": 2, "rounds": 1, "providers": ["cpu"]})
    assert main(["--recipe", str(recipe), "--out", str(tmp_path / "run")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and all("plain_int8.onnx was quantized for cpu-vnni" in w for w in warnings)
    stages = json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]
    assert stages["quantize"]["target_device"] == "cpu-vnni" and stages["quantize"]["overflow_fix"] == "disable"
