import json
import re

import pytest
import torch
from conftest import ROOT, one_line_error
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from compress.cli import main
from compress.recipe import validate_recipe
from compress.study.points import scratch_widths

STRATEGIES = ["plain", "plain-uniform", "plain-latency", "plain-rebranch", "multibranch", "scratch"]


@pytest.mark.parametrize("keep", [0.7, 0.5, 0.3])
def test_scratch_widths_hit_the_mac_target_within_two_percent(keep):
    import torch_pruning as tp

    from repvgg import RepVGG, reparameterize

    recipe = validate_recipe({"name": "w", "model": {"num_blocks": [2, 4, 14, 1],
                                                     "width_multiplier": [0.375, 0.375, 0.375, 1.25],
                                                     "stem_stride": 1}})
    example = torch.randn(1, 3, 32, 32)
    widths = scratch_widths(recipe, keep, 10, example, unit=8)

    def plain_macs(**arch) -> float:  # counted on the real re-parameterized model
        model = RepVGG([2, 4, 14, 1], num_classes=10, stem_stride=1, **arch).eval()
        return tp.utils.count_ops_and_params(reparameterize(model), example)[0]

    full = plain_macs(width_multiplier=[0.375, 0.375, 0.375, 1.25])
    assert abs(plain_macs(widths=widths) / full - keep) <= 0.02 * keep
    assert len(widths) == 5  # stem and four stages


def _smoke_recipe(tiny_recipe, tmp_path, **study):
    return str(tiny_recipe(
        model={"num_blocks": [1, 2, 2, 1], "width_multiplier": [1, 1, 1, 0.5]},  # identity branches: coupling
        data={"image_size": 16, "test_subset": 200},
        train={"epochs": 2, "lr": 0.05},
        prune={"round_to": 8, "importance": "l2",
               "latency": {"threads": 1, "rounds": 1, "grid_points": 3, "cache_dir": str(tmp_path / "cache"),
                           "verify": 0}},  # the measured check of a plan: tests/test_measure.py
        finetune={"epochs": 1, "lr": 0.01, "train_subset": 640, "distill": {"alpha": 0.5, "temperature": 4.0}},
        quantize={"mode": "qat", "epochs": 1, "calibration_size": 64, "lr": 1e-4, "train_subset": 320},
        bench={"batch_sizes": [8, 1], "warmup": 2, "iters": 5, "rounds": 2, "threads": 1},
        study={"keep_macs": [0.6, 0.4], "scratch_keep_macs": [0.6], "strategies": STRATEGIES,
               "bootstrap_resamples": 200, **study},
    ))


@pytest.mark.slow
def test_digits_smoke_study_with_every_strategy_then_a_second_study_on_its_base(tiny_recipe, tmp_path, capsys):
    recipe = _smoke_recipe(tiny_recipe, tmp_path, keep_latency=[0.6])  # plain-latency: one point of its own
    out = tmp_path / "study"
    assert main(["--recipe", recipe, "--out", str(out)]) == 0
    md = (out / "study.md").read_text()
    assert md.index("## Conclusions") < md.index("## Points") < md.index("## Coupling")
    assert "test images only, not training seeds" in md
    result = json.loads((out / "study.json").read_text())
    by = {r["strategy"]: r for r in result["rows"] if r["keep"] in (0.6, 1.0)}
    assert set(by) == {"unpruned", *STRATEGIES}
    assert [r["strategy"] for r in result["rows"] if r["keep"] == 0.4] == [  # scratch, plain-latency: 0.6 alone
        s for s in STRATEGIES if s not in ("scratch", "plain-latency")]
    for r in result["rows"]:  # measured latencies at both batches, top-1 inside its own Wilson interval
        assert r["fp32_n"] == r["int8_n"] == 200
        for p in ("fp32", "int8"):
            assert set(r[f"{p}_ms"]) == {"8", "1"} and min(r[f"{p}_ms"].values()) > 0
            assert all(ms == min(r[f"{p}_rounds_ms"][b]) for b, ms in r[f"{p}_ms"].items())  # the fastest round
            assert r[f"{p}_ci"][0] <= r[f"{p}_top1"] <= r[f"{p}_ci"][1]
    timed = json.loads((out / "study_bench.json").read_text())["results"]  # a round's timing: its fastest call
    assert sorted(r[f"{p}_rounds_ms"][b] for r in result["rows"] for p in ("fp32", "int8") for b in ("8", "1")) \
        == sorted(t["round_fastest_ms"] for t in timed)
    for strategy in ("plain", "plain-uniform", "plain-rebranch", "multibranch", "scratch"):
        assert abs(by[strategy]["macs_M"] / by["unpruned"]["macs_M"] - 0.6) < 0.08, strategy
    # plain-latency is held to its latency target (ORT CPU, FP32, batch 8), not to its MACs
    target = by["plain-latency"]["latency_target"]
    assert target["predicted_ms"] <= target["budget_ms"] == pytest.approx(0.6 * target["before_ms"])
    assert "## Latency targets" in md

    # the per-image predictions behind every top-1, and the comparisons drawn from them
    point = out / "points" / "plain_0.6"
    arts = json.loads((point / "summary.json").read_text())["stages"]["export"]["artifacts"]
    with __import__("numpy").load(arts["pruned_fp32"]["predictions"]) as f:
        assert f["predicted"].shape == f["label"].shape == (200,)
        assert (f["predicted"] == f["label"]).mean() * 100 == pytest.approx(arts["pruned_fp32"]["top1"])
    for c in result["comparisons"]:
        assert c["a"] == "plain" and c["low"] <= c["diff"] <= c["high"]
        assert c["significant_uncorrected"] == (c["low"] > 0 or c["high"] < 0) and 0 <= c["p"] <= 1
        assert c["significant"] <= c["significant_uncorrected"]  # Holm over all the comparisons
    assert {c["batch"] for c in result["comparisons"]} <= {8, 1}

    # scratch: searched widths, distilled from the pruned points' teacher, on base + fine-tune images
    scratch = json.loads((out / "points" / "scratch_0.6" / "summary.json").read_text())["stages"]["train"]
    base_images = json.loads((out / "base" / "summary.json").read_text())["stages"]["train"]["images_seen"]
    assert scratch["images_seen"] == by["scratch"]["images_seen"]
    assert 0 <= scratch["images_seen"] - (base_images + 640) < base_images / 2  # whole epochs, at least as many
    assert by["plain"]["images_seen"] == base_images + 640
    recipe_used = json.loads((out / "points" / "scratch_0.6" / "summary.json").read_text())
    assert recipe_used["stages"]["train"]["start"] == {"init": "random"}

    # coupling: one width per stage in the multibranch model, free widths in the plain one
    assert result["coupling"]["groups_plain"] > result["coupling"]["groups_training_time"]
    assert all(len(set(stage)) == 1 for stage in by["multibranch"]["stage_widths"])
    assert re.search(r"\| multibranch \| 0\.6 \| \d+ \| \d+ \| \d+ \| \d+ \| \d+ \|", md)
    assert (out / "pareto.png").stat().st_size > 10_000
    # published from its directory: the header names the command that ran the study, the figure is copied beside it
    assert result["run"]["command"] == f"python compress.py --recipe {recipe} --out {out}"
    assert main(["report", str(out), "--to", str(tmp_path / "results" / "smoke.md")]) == 0
    published = (tmp_path / "results" / "smoke.md").read_text()
    assert published.startswith(f"# Study: tiny\n\n- command: `{result['run']['command']}`\n")
    assert md.partition("\n")[2].strip() in published and "![pareto](smoke_pareto.png)" in published
    assert (tmp_path / "results" / "smoke_pareto.png").read_bytes() == (out / "pareto.png").read_bytes()
    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    assert not any(t.startswith("accuracy_vs_latency/") for t in events.Tags()["scalars"])  # a curve per strategy
    # the HParams table: one entry per point, precision and batch (ORT CPU)
    assert len(list((out / "tb" / "hparams").iterdir())) == 11 * 2 * 2
    curve = EventAccumulator(str(out / "tb" / "curves" / "plain"), size_guidance={"scalars": 0})
    curve.Reload()
    plain = [r for r in result["rows"] if r["strategy"] in ("plain", "unpruned") and r["seed"] == 0]
    assert sorted(e.step for e in curve.Scalars("accuracy_vs_latency/ort_cpu_b8_int8")) == sorted(
        round(r["int8_ms"]["8"] * 1000) for r in plain)  # the plain curve ends at the unpruned model

    # rerun: every point is reused, nothing is trained again
    capsys.readouterr()
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("points/*/*.pt")}
    assert main(["--recipe", recipe, "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("points/*/*.pt")} == mtimes
    assert "] running" not in capsys.readouterr().err

    # a second study on the first one's base: nothing trained, its finished points reused in place
    second = tmp_path / "second"
    recipe2 = _smoke_recipe(tiny_recipe, tmp_path, base_dir=str(out), strategies=["plain", "plain-rebranch"])
    assert main(["--recipe", recipe2, "--out", str(second)]) == 0
    err = capsys.readouterr().err
    assert "] running" not in err and "plain_0.6: reused from" in err
    assert not (second / "base").exists() and not (second / "points").exists()
    assert json.loads((second / "study.json").read_text())["base"]["dir"] == str(out / "base")

    # seeds: the first seed's points reused, a second fine-tune and QAT of each on the same base
    recipe3 = _smoke_recipe(tiny_recipe, tmp_path, base_dir=str(out), strategies=["plain"], keep_macs=[0.6],
                            seeds=2)
    assert main(["--recipe", recipe3, "--out", str(second)]) == 0
    assert "plain_0.6: reused from" in capsys.readouterr().err
    seeded = json.loads((second / "points" / "plain_0.6_seed1" / "summary.json").read_text())["stages"]
    first = json.loads((point / "summary.json").read_text())["stages"]
    assert seeded["reparam"]["artifact_key"] == first["reparam"]["artifact_key"]  # the one base
    assert seeded["prune"]["artifact_key"] == first["prune"]["artifact_key"]
    assert seeded["finetune"]["artifact_key"] != first["finetune"]["artifact_key"]
    rows = json.loads((second / "study.json").read_text())["rows"]
    assert [(r["strategy"], r["seed"]) for r in rows] == [("unpruned", 0), ("plain", 0), ("plain", 1)]
    assert "| plain | 0.6 | +1 |" in (second / "study.md").read_text()

    # ResRep and plain without its re-fit on the same base: ResRep trains in its prune stage on the fine-tune's
    # images (no fine-tune after), so every pruned point has seen as many images
    recipe4 = _smoke_recipe(tiny_recipe, tmp_path, base_dir=str(out), strategies=["plain", "plain-norefit", "resrep"],
                            keep_macs=[0.6])
    third = tmp_path / "resrep"
    assert main(["--recipe", recipe4, "--out", str(third)]) == 0
    rows = {r["strategy"]: r for r in json.loads((third / "study.json").read_text())["rows"]}
    assert rows["resrep"]["images_seen"] == rows["plain-norefit"]["images_seen"] == rows["plain"]["images_seen"]
    stages = json.loads((third / "points" / "resrep_0.6" / "summary.json").read_text())["stages"]
    assert stages["prune"]["planner"] == "resrep" and stages["finetune"]["epochs"] == 0
    assert stages["prune"]["resrep"]["masked_max"] == 0  # the masked rows reached zero: the cut is exact
    assert stages["prune"]["top1"] == pytest.approx(stages["prune"]["resrep"]["top1_before_cut"], abs=0.6)
    assert 0.5 < stages["prune"]["keep_macs_achieved"] <= 0.6
    norefit = json.loads((third / "points" / "plain-norefit_0.6" / "summary.json").read_text())["stages"]["prune"]
    assert "reconstruct" not in norefit and "reconstruct" in first["prune"]
    assert "| resrep | 0.6 |" in (third / "study.md").read_text()

    # ... and one whose base differs is refused in one line that names what changed
    other = tiny_recipe(name="other", train={"epochs": 3}, study={"base_dir": str(out), "keep_macs": [0.6]})
    line = one_line_error(capsys, ["--recipe", str(other), "--out", str(tmp_path / "third")])
    assert "study.base_dir" in line and "does not hold this recipe's base" in line and "train" in line


def test_each_strategy_takes_its_own_keep_fractions_and_a_bad_one_is_one_line(tiny_recipe, capsys):
    from compress.recipe.schema import StudyCfg
    from compress.study.strategies import strategy_keeps

    study = StudyCfg(keep_macs=[0.5, 0.2], keep_latency=[0.5, 0.4], scratch_keep_macs=[0.5])
    assert strategy_keeps(study, "plain") == strategy_keeps(study, "multibranch") == [0.5, 0.2]
    assert strategy_keeps(study, "plain-latency") == [0.5, 0.4]
    assert strategy_keeps(study, "scratch") == [0.5]
    assert strategy_keeps(StudyCfg(keep_macs=[0.3]), "plain-latency") == [0.3]  # unset: keep_macs
    recipe = tiny_recipe(study={"keep_macs": [0.5], "keep_latency": [0.5, 1.5], "strategies": ["plain-latency"]})
    line = one_line_error(capsys, ["--recipe", str(recipe), "--dry-run"])
    assert "study.keep_latency" in line and "1.5" in line


def test_base_dir_without_a_finished_base_is_one_line(tiny_recipe, tmp_path, capsys):
    recipe = tiny_recipe(study={"base_dir": str(tmp_path / "nothing"), "keep_macs": [0.5]})
    line = one_line_error(capsys, ["--recipe", str(recipe), "--out", str(tmp_path / "s")])
    assert line.startswith("error: study.base_dir:") and "no finished train stage" in line


def point(strategy, latency, correct_first, keep=0.5, rounds=None, images=1000):
    """A study point and its row: the first `correct_first` of `images` test images right, at `latency` ms, with
    the bench's round medians `rounds` (default: every round at `latency`)."""
    import numpy as np

    correct = (np.arange(images) < correct_first).astype(float)
    return ({"strategy": strategy, "tag": f"{strategy}_{keep:g}", "correct": {"fp32": correct, "int8": correct},
             "labels": np.zeros(images, dtype=np.int64)},
            {"strategy": strategy, "keep": keep, "fp32_ms": {8: latency}, "int8_ms": {8: latency},
             "fp32_top1": correct.mean() * 100, "int8_top1": correct.mean() * 100,
             "fp32_rounds_ms": {8: rounds or [latency] * 3}, "int8_rounds_ms": {8: rounds or [latency] * 3}})


def test_compare_interpolates_each_curve_at_the_shared_latencies_on_the_same_images():
    from compress.study.analysis import compare

    pairs = [point("unpruned", 4.0, 990), point("plain", 1.0, 600), point("plain", 2.0, 800),
             point("multibranch", 1.5, 500), point("multibranch", 3.0, 900), point("scratch", 5.0, 950)]
    points, rows = zip(*pairs)
    result = [c for c in compare(list(points), list(rows), [8], resamples=500)["comparisons"]
              if c["precision"] == "fp32"]
    # both pruning curves end at the unpruned model (4 ms), not compared with itself; scratch (5 ms) is beyond
    assert [(c["b"], c["latency_ms"]) for c in result] == [("multibranch", 1.5), ("multibranch", 2.0),
                                                           ("multibranch", 3.0)]
    at15, at20, at30 = result
    assert (at15["top1_a"], at15["top1_b"]) == pytest.approx((70.0, 50.0))  # plain halfway between its points
    assert (at20["top1_a"], at20["top1_b"]) == pytest.approx((80.0, 50 * 2 / 3 + 90 / 3))  # multibranch a third on
    assert (at30["top1_a"], at30["top1_b"]) == pytest.approx(((80 + 99) / 2, 90.0))  # plain towards the unpruned
    assert at15["diff"] == pytest.approx(20.0) and at15["significant"] and at15["low"] > 15


def test_coupling_is_compared_apart_from_the_refit_when_a_study_has_both():
    from compress.study.analysis import compare

    pairs = [point("unpruned", 4.0, 990), point("plain", 1.0, 800), point("plain-norefit", 1.0, 700),
             point("multibranch", 1.0, 650)]
    points, rows = zip(*pairs)
    found = {(c["a"], c["b"]): c["diff"] for c in compare(list(points), list(rows), [8], resamples=200)["comparisons"]
             if c["precision"] == "fp32" and c["latency_ms"] == 1.0}
    # plain's lead over multibranch (15 pt) = the re-fit (plain vs plain-norefit, 10) + the coupling (5)
    assert found == pytest.approx({("plain", "plain-norefit"): 10.0, ("plain", "multibranch"): 15.0,
                                   ("plain-norefit", "multibranch"): 5.0})


def test_compare_uses_each_curves_upper_hull():
    from compress.study.analysis import compare

    pairs = [point("unpruned", 4.0, 990, keep=1.0),
             point("plain", 1.0, 600, keep=0.3), point("plain", 1.02, 500, keep=0.4),  # slower, worse: off the hull
             point("plain", 2.0, 800, keep=0.5),
             point("multibranch", 1.5, 500, keep=0.3, rounds=[1.5, 2.1, 1.4]),
             point("multibranch", 1.8, 700, keep=0.5, rounds=[1.8, 1.7, 2.0])]
    points, rows = zip(*pairs)
    result = compare(list(points), list(rows), [8], resamples=300)
    assert {(o["strategy"], o["keep"]) for o in result["off_hull"]} == {("plain", 0.4)}
    fp32 = {c["latency_ms"]: c for c in result["comparisons"] if c["precision"] == "fp32"}
    # multibranch's own points (nothing of its curve interpolated, whatever its rounds) and plain's 2.0 ms, where
    # multibranch runs on towards the unpruned model; plain at 1.5 ms lies on its hull's line from 1.0 to 2.0 ms
    assert sorted(fp32) == [1.5, 1.8, 2.0] and not result["skipped"]
    assert fp32[1.5]["top1_a"] == pytest.approx(70.0)  # 60% -> 80%, halfway; the 1.02 ms point plays no part
    assert all(c["significant"] <= c["significant_uncorrected"] for c in result["comparisons"])


def compare_with_plain_rounds(rounds_fast, rounds_slow):
    """`compare` of plain's two points, each at its fastest of rounds `rounds_fast` / `rounds_slow`, with multibranch
    between them and beyond: plain's curve is interpolated at multibranch's first point."""
    from compress.study.analysis import compare

    fast, slow = min(rounds_fast), min(rounds_slow)
    pairs = [point("plain", fast, 600, keep=0.3, rounds=rounds_fast),
             point("plain", slow, 800, keep=0.5, rounds=rounds_slow),
             point("multibranch", (fast + slow) / 2, 500, keep=0.3), point("multibranch", slow + 0.1, 700, keep=0.5)]
    points, rows = zip(*pairs)
    return compare(list(points), list(rows), [8], resamples=300)


def test_compare_skips_an_interpolation_between_points_whose_order_changes_between_quiet_rounds():
    # both points timed undisturbed in the first two rounds, in opposite orders: the gap is within timing noise
    result = compare_with_plain_rounds([1.0, 1.05, 1.6], [1.04, 1.02, 1.7])
    assert {k["latency_ms"] for k in result["skipped"]} == {1.01}
    assert result["skipped"][0]["why"] == ("plain interpolates between points 0.020 ms apart whose order changes "
                                           "between undisturbed bench rounds (per-round difference -0.030 to +0.040 "
                                           "ms)")


def test_compare_keeps_an_interpolation_whose_order_only_a_disturbed_round_changes():
    # the second round timed the fast point 50% above its fastest (other work): it says nothing of the order; the
    # two undisturbed rounds agree. A round that slows both (the third) is left out alike
    result = compare_with_plain_rounds([1.0, 1.5, 1.8, 1.01], [1.2, 1.21, 1.95, 1.19])
    assert not result["skipped"] and {c["latency_ms"] for c in result["comparisons"]} == {1.095, 1.19}


def test_compare_skips_an_interpolation_with_too_few_rounds_that_timed_both_points_undisturbed():
    result = compare_with_plain_rounds([1.0, 1.5, 1.6], [1.5, 1.2, 1.3])
    assert {k["why"] for k in result["skipped"]} == {  # FP32 and INT8 alike
        "plain interpolates between points 0.200 ms apart, timed both undisturbed (within 10% of their fastest) in "
        "0 of 3 bench rounds, fewer than 2, and their own undisturbed rounds (1 and 2) are too few"}


def test_compare_reads_the_order_of_points_undisturbed_in_different_rounds_from_their_own_timings():
    # the fast point was timed undisturbed in the first two rounds, the slow one in the last two: no round timed both
    result = compare_with_plain_rounds([1.0, 1.05, 1.6, 1.6], [1.5, 1.5, 1.2, 1.25])
    assert not result["skipped"] and {c["latency_ms"] for c in result["comparisons"]} == {1.1, 1.2}
    # the same, with their undisturbed timings overlapping (1.09 above 1.05): their order is not told apart
    result = compare_with_plain_rounds([1.0, 1.09, 1.6, 1.6], [1.5, 1.5, 1.05, 1.08])
    assert {k["why"] for k in result["skipped"]} == {
        "plain interpolates between points 0.050 ms apart, timed both undisturbed (within 10% of their fastest) in "
        "0 of 4 bench rounds, fewer than 2, and their own undisturbed rounds (2 and 2) overlap"}


def test_points_scored_on_other_test_images_are_one_line():
    import numpy as np

    from compress.study.analysis import StudyError, compare

    pairs = [point("plain", 1.0, 600), point("multibranch", 1.0, 500, images=999)]
    points, rows = zip(*pairs)
    points[1]["labels"] = np.ones(999, dtype=np.int64)
    with pytest.raises(StudyError, match=r"^study: multibranch_0.5 was evaluated on other test images than "
                                         r"plain_0.5 \(999 vs 1000 labels"):
        compare(list(points), list(rows), [8])


def test_gpu_study_recipe_covers_all_six_strategies_and_passes_dry_run(capsys):
    assert main(["--recipe", str(ROOT / "recipes" / "study_cifar10_a0_gpu.yaml"), "--dry-run"]) == 0
    plan = capsys.readouterr().out.splitlines()[-1]
    assert all(f"'{s}'" in plan for s in STRATEGIES) and plan.startswith("plan: study over")


def test_train_distill_needs_its_teacher_in_one_line(tiny_recipe, tmp_path, capsys):
    recipe = tiny_recipe(train={"distill": {"alpha": 0.5, "temperature": 4.0}})
    line = one_line_error(capsys, ["--recipe", str(recipe), "--out", str(tmp_path / "r")])
    assert "train: distill and teacher go together" in line
    missing = tiny_recipe(train={"distill": {"alpha": 0.5}, "teacher": str(tmp_path / "none.pt")})
    line = one_line_error(capsys, ["--recipe", str(missing), "--out", str(tmp_path / "r2")])
    assert "none.pt" in line and "not found" in line


def test_conclusions_name_the_correction_and_what_was_left_out():
    from compress.study.report import conclusions

    result = {"settings": {"main_batch": 8}, "rows": [{"strategy": "plain", "keep": 0.5, "seed": 0}],
              "comparisons": [{"a": "plain", "b": "multibranch", "precision": "fp32", "batch": 8, "latency_ms": 0.8,
                               "top1_a": 70.0, "top1_b": 65.0, "diff": 5.0, "low": 4.0, "high": 6.0, "p": 0.001,
                               "significant": True, "seed_diffs": [5.0]}],
              "off_hull": [{"strategy": "plain", "keep": 0.3, "precision": "int8", "batch": 8}],
              "skipped": [{"a": "plain", "b": "scratch", "precision": "fp32", "batch": 8, "latency_ms": 0.5,
                           "why": "plain interpolates between points 0.010 ms apart whose order changes between "
                                  "bench rounds"}]}
    text = "\n".join(conclusions(result))
    assert "plain vs multibranch, FP32 at 0.800 ms (batch 8): 70.00 vs 65.00% top-1, +5.00 pt [+4.00, +6.00]" in text
    assert "Holm-corrected over all 1 comparisons" in text
    assert "Off the upper hull, not compared: plain at keep 0.3 in INT8" in text
    assert "Not compared: plain vs scratch FP32 at 0.500 ms: plain interpolates between points 0.010 ms apart" in text
    assert "every compared point is one trained model" in text and "seeds +0" not in text


def test_each_comparison_gets_its_difference_on_every_seeds_own_curves():
    """Seed +1's curves are their own: interpolated along that seed's upper hull (a point under it ignored), ended
    by the one unpruned model, a point with its seed +0 point's widths at that point's latency (the same network,
    timed again), and out of reach where that seed's curve does not cover the latency."""
    from compress.study.analysis import seed_differences
    from compress.study.report import conclusions

    def row(strategy, keep, seed, widths, ms, top1):
        return {"strategy": strategy, "keep": keep, "seed": seed, "widths": widths, "fp32_ms": {8: ms},
                "fp32_top1": top1}

    rows = [row("unpruned", 1, 0, [16], 2.0, 80.0),
            row("plain", 0.5, 0, [8], 1.0, 70.0), row("plain", 0.5, 1, [8], 1.3, 72.0),  # timed 1.3: read at 1.0
            row("plain", 0.3, 0, [4], 0.5, 40.0), row("plain", 0.3, 1, [6], 1.4, 60.0),  # re-planned, under the hull
            row("multibranch", 0.5, 0, [8], 1.0, 65.0), row("multibranch", 0.5, 1, [4], 1.2, 66.0)]  # re-planned
    where = {"a": "plain", "b": "multibranch", "precision": "fp32", "batch": 8}
    comparisons = [{**where, "latency_ms": 1.5}, {**where, "latency_ms": 1.05}]
    seed_differences(rows, comparisons)
    at15, at105 = (c["seed_diffs"] for c in comparisons)
    assert at15 == pytest.approx([75.0 - 72.5, 76.0 - (66 + 14 * 0.3 / 0.8)])
    assert at105[0] == pytest.approx(70.5 - 65.75) and at105[1] is None  # seed +1's multibranch starts at 1.2 ms

    c = {**comparisons[0], "top1_a": 75.0, "top1_b": 72.5, "diff": 2.5, "low": 1.0, "high": 4.0, "p": 0.001,
         "significant": True}
    text = "\n".join(conclusions({"settings": {"main_batch": 8}, "rows": rows, "comparisons": [c],
                                  "off_hull": [], "skipped": []}))
    assert "+2.50 pt [+1.00, +4.00]; seeds +0 to +1 on their own curves: +2.50 / +4.75 pt" in text
    assert "each of the 2 seeds' own curves" in text


def test_a_further_seed_shares_the_base_and_retrains_what_follows(tmp_path):
    from compress.rundir import RunDir
    from compress.study.points import reseeded

    recipe = validate_recipe({"name": "s", "seed": 3, "model": {"name": "RepVGG-A0"}})
    keys = {name: RunDir(tmp_path / name, r) for name, r in
            {"first": recipe, "pruned": reseeded(recipe, 1, from_scratch=False),
             "scratch": reseeded(recipe, 1, from_scratch=True)}.items()}
    assert reseeded(recipe, 0, from_scratch=False) is recipe
    pruned = keys["pruned"].recipe
    assert (pruned.seed, pruned.finetune.seed, pruned.quantize.seed) == (3, 4, 4)
    for stage in ("train", "reparam", "prune"):  # the one base, pruned the same way
        assert keys["pruned"].artifact_key(stage) == keys["first"].artifact_key(stage)
    for stage in ("finetune", "quantize"):
        assert keys["pruned"].artifact_key(stage) != keys["first"].artifact_key(stage)
    assert keys["scratch"].recipe.seed == 4  # scratch trains from a seed of its own
    assert keys["scratch"].artifact_key("train") != keys["first"].artifact_key("train")


def test_reseeded_data_draws_another_training_subset():
    from compress.data import build_data

    recipe = validate_recipe({"name": "d", "model": {"name": "RepVGG-A0"}, "data": {"kind": "digits"}})
    data = build_data(recipe.data, seed=0)
    assert data.reseeded(None) is data and data.reseeded(0) is data
    first, other = (d.with_train_subset(100).train_set.indices for d in (data, data.reseeded(1)))
    assert first != other and len(first) == len(other) == 100


@pytest.mark.slow
def test_digits_prune_or_retrain_curve_with_two_budgets(tiny_recipe, tmp_path):
    recipe = _smoke_recipe(tiny_recipe, tmp_path, strategies=["plain"], keep_macs=[0.6], added_images=[320, 640],
                           budget_keep_latency=0.6)
    out = tmp_path / "budget"
    out.mkdir()
    (out / "timings.json").write_text('{"points/gone": 60.0}')  # a point an earlier recipe asked for
    assert main(["--recipe", recipe, "--out", str(out)]) == 0
    budget = json.loads((out / "study.json").read_text())["budget"]
    sides = [(r["side"], r["added_images"]) for r in budget["rows"]]
    assert sides[:4] == [("budget-plain", 320), ("budget-plain", 640), ("budget-resrep", 320), ("budget-resrep", 640)]
    assert [s for s, _ in sides[4:]] == ["budget-scratch"] * 3 and sides[-1][1] is None  # the last: equal total
    resrep = {r["added_images"]: r for r in budget["rows"] if r["side"] == "budget-resrep"}
    plain = {r["added_images"]: r for r in budget["rows"] if r["side"] == "budget-plain"}
    assert all(resrep[n]["images_seen"] == plain[n]["images_seen"] for n in (320, 640))  # the same added images
    twin = json.loads((out / "points" / "budget-resrep_add320" / "summary.json").read_text())["stages"]["prune"]
    assert twin["planner"] == "resrep" and twin["latency"]["budget_ms"] == pytest.approx(
        0.6 * twin["latency"]["before_ms"]) and twin["latency"]["predicted_ms"] <= twin["latency"]["budget_ms"]
    scratch = {r["added_images"]: r for r in budget["rows"] if r["side"] == "budget-scratch"}
    assert scratch[320]["images_seen"] <= 320 and scratch[None]["images_seen"] > 640
    trained = json.loads((out / "points" / "budget-scratch_add320" / "summary.json").read_text())["stages"]["train"]
    assert trained["images_seen"] == scratch[320]["images_seen"]  # what the point really trained on
    # the scratch widths were matched to the pruned model's measured latency (within 5%, else the closest tried)
    match = budget["match"]
    assert match["tries"] and 0 < match["pruned_ratio"] < 1
    assert min(abs(t["measured_ratio"] / match["pruned_ratio"] - 1) for t in match["tries"]) < 0.5
    # each try timed in blocks of rounds until two agreed (at most 4), as the prune stage's loop times a plan
    assert all(2 <= t["blocks"] <= 4 and (t["agreed"] or t["blocks"] == 4) for t in match["tries"])
    md = (out / "study.md").read_text()
    first = md.splitlines()[2]  # the title, a blank line, then the prune-or-retrain sentence
    assert first == budget["verdict"] and ("matched pruning" in first or "did not match" in first)
    assert "## Prune or retrain" in md and (out / "prune_or_retrain.png").stat().st_size > 10_000
    assert "- FP32, equal added images: at 320: pruned " in md and "; at 640: pruned " in md and ", ResRep " in md
    assert budget["resrep"]["fp32"] in md and "pruning beat ResRep at" in budget["resrep"]["fp32"]
    assert "- INT8, equal total images: scratch on " in md
    assert "| points/budget-scratch_add640 |" in md and "points/gone" not in md  # this study's phases only
    # the match is kept under the pruned model's key, so a rerun trains no scratch point anew
    kept = json.loads((out / "budget_match.json").read_text())
    assert kept["match"] == match and kept["match"]["widths"] in [t["widths"] for t in match["tries"]]
    pruned = json.loads((out / "points" / "budget-plain_add320" / "summary.json").read_text())["stages"]
    assert pruned["prune"]["latency"]["budget_ms"] == pytest.approx(0.6 * pruned["prune"]["latency"]["before_ms"])


def test_prune_or_retrain_comparisons_pair_equal_added_and_equal_total_images():
    from compress.study.budget import PRUNED, SCRATCH, comparisons

    def row(side, added, seen, top1):
        return {"side": side, "added_images": added, "images_seen": seen, "fp32_top1": top1,
                "fp32_ci": [top1 - 1, top1 + 1]}

    rows = [row(PRUNED, 10_000, 310_000, 71.0), row(PRUNED, 10_000, 310_000, 70.0),
            row(PRUNED, 50_000, 350_000, 74.0), row(PRUNED, 50_000, 350_000, 73.0),
            row(SCRATCH, 10_000, 10_000, 30.0), row(SCRATCH, 10_000, 10_000, 26.0),
            row(SCRATCH, None, 349_000, 73.0), row(SCRATCH, None, 349_000, 72.0)]
    added, total = comparisons(rows, "fp32")
    # 50,000 was not run from scratch, so only 10,000 is compared at equal added images; means, seed ranges
    assert added == ("FP32, equal added images: at 10,000: pruned 70.50% (seeds 70.00-71.00, test-set 95% interval "
                     "+-1.0), scratch 28.00% (seeds 26.00-30.00, test-set 95% interval +-1.0).")
    # equal total: the pruned budget with the most images (base counted) not above scratch's 349k is 10,000 added
    assert "scratch on 349,000 images 72.50%" in total and "pruned on 310,000 (10,000 added" in total
    assert "70.50%" in total
    # without scratch at equal total images (study.budget_equal_total: false) only the first comparison is made
    assert comparisons([r for r in rows if r["added_images"] is not None], "fp32") == [added]


def test_latency_matched_scratch_widths_stay_on_the_grid_and_fill_up_to_the_target():
    from compress.study.budget import grid_widths

    full, unit = [24, 24, 48, 96, 640], 8
    weight = [1.0, 1.0, 0.25, 0.0625, 0.015]  # per-channel cost falls with resolution, as in the plain stack

    def cost(widths):
        return sum(k * w for k, w in zip(weight, widths))

    for target in (0.3 * cost(full), 0.5 * cost(full), 0.77 * cost(full)):
        widths = grid_widths(full, cost, target, unit)
        assert all(w % unit == 0 and unit <= w <= f for w, f in zip(widths, full))
        widened = [widths[:i] + [w + unit] + widths[i + 1:] for i, w in enumerate(widths) if w + unit <= full[i]]
        if cost(widths) <= target:  # filled: no stage can take another unit under the target
            assert all(cost(g) > target for g in widened)
        else:  # or one unit over, where that is closer
            assert any(cost([*widths[:i], w - unit, *widths[i + 1:]]) <= target for i, w in enumerate(widths))
        # never farther than the one factor alone, floored to the grid
        one_factor = max(([max(unit, int(w * f / 100 / unit) * unit) for w in full] for f in range(101)),
                         key=lambda ws: (cost(ws) <= target, cost(ws)))
        assert abs(cost(widths) - target) <= abs(cost(one_factor) - target)
    # at half the cost one factor floors to [8, 8, 24, 56, 416] (31.74 of 37.8); filling reaches 37.76
    assert grid_widths(full, cost, 37.8, unit) == [8, 8, 32, 80, 584]
