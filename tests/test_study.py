import json
import re

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from compress.cli import main


def test_digits_smoke_study_fills_every_cell_and_reuses_points(tiny_recipe, tmp_path, capsys):
    recipe = str(tiny_recipe(
        model={"num_blocks": [1, 2, 2, 1]},  # identity branches in stages 1-3: coupling to show
        train={"epochs": 2, "lr": 0.05},
        prune={"round_to": 4, "importance": "l2"},
        finetune={"epochs": 1, "lr": 0.01},
        quantize={"mode": "qat", "epochs": 1, "calibration_size": 64, "lr": 1e-4},
        bench={"batch_sizes": [4], "warmup": 2, "iters": 5, "rounds": 2},
        study={"keep_macs": [0.5],
               "strategies": ["plain", "plain-uniform", "plain-rebranch", "multibranch", "scratch"]},
    ))
    out = tmp_path / "study"
    assert main(["--recipe", recipe, "--out", str(out)]) == 0
    md = (out / "study.md").read_text()
    for strategy in ("unpruned", "plain", "plain-uniform", "plain-rebranch", "multibranch", "scratch"):
        assert f"## {strategy}\n" in md
    rows = [line for line in md.splitlines() if re.match(r"\| (0\.5|1) \|", line)]
    assert len(rows) == 6
    for row in rows:  # every numeric cell is a measured, positive number
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(float(c) > 0 for c in cells[:7]), row
    assert "prunable groups in the training-time model" in md
    assert (out / "pareto.png").stat().st_size > 10_000
    result = json.loads((out / "study.json").read_text())
    coupling = result["coupling"]
    assert coupling["groups_plain"] > coupling["groups_training_time"]
    by = {r["strategy"]: r for r in result["rows"]}
    stage_widths = by["multibranch"]["stage_widths"]  # one width per stage: the coupling at work
    assert len(stage_widths) == 5 and set(by["multibranch"]["widths"]) == set(stage_widths)
    assert len(set(by["plain"]["widths"])) >= 1 and by["plain"]["macs_M"] < by["unpruned"]["macs_M"]
    finetuned = {s: json.loads((out / "points" / f"{s}_0.5" / "summary.json").read_text())["stages"]["finetune"]
                 for s in ("plain", "plain-rebranch", "multibranch")}
    assert {s: f["structure"] for s, f in finetuned.items()} == {"plain": "bn", "plain-rebranch": "rebranch",
                                                                 "multibranch": "multibranch"}
    for strategy in ("plain", "plain-uniform", "plain-rebranch", "multibranch", "scratch"):
        assert abs(by[strategy]["macs_M"] / by["unpruned"]["macs_M"] - 0.5) < 0.1

    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    assert "study/plain/int8_top1" in events.Tags()["scalars"]
    assert b"custom_scalars__config__" in b"".join(p.read_bytes() for p in (out / "tb").iterdir())

    # rerun: every point is reused, nothing is trained again
    capsys.readouterr()
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("points/*/*.pt")}
    assert main(["--recipe", recipe, "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("points/*/*.pt")} == mtimes
    assert "] running" not in capsys.readouterr().err
