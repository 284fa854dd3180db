"""The command line: subcommands with `run` as the default, one error line for every command, `report` re-writing
a finished run's report with the command that measured it, and `int8-diagnosis` on a run and on a study's point."""

import copy
import json
import re

import pytest
import torch
from conftest import TINY, one_line_error, write_recipe

from compress.cli import COMMANDS, _diagnosed_run, main, parser
from compress.int8_diagnosis import quantizer_scales, scale_moves
from compress.quant import quantize_model
from compress.record import invocation
from compress.study.report import read_result
from repvgg import RepVGG, reparameterize


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^    (\S+)", out, re.MULTILINE)
    assert listed == list(COMMANDS)


def test_run_is_the_default_command(tmp_path, capsys):
    recipe = str(write_recipe(tmp_path / "tiny.yaml", TINY))
    assert main(["--recipe", recipe, "--dry-run"]) == 0
    default = capsys.readouterr().out
    assert main(["run", "--recipe", recipe, "--dry-run"]) == 0
    assert capsys.readouterr().out == default and "plan: train -> reparam" in default


@pytest.mark.parametrize("argv, needle", [
    (["latency-table", "--recipe", "{tmp}/nope.yaml"], "nope.yaml"),
    (["inspect", "{tmp}/missing.pt"], "no such file"),
    (["profile", "{tmp}/missing.onnx"], "no such file"),
    (["int8-diagnosis", "{tmp}"], "summary.json not found"),
    (["report", "{tmp}"], "neither summary.json nor study.json"),
    (["report", "{tmp}/run"], "records no recipe"),
])
def test_every_command_prints_a_user_error_as_one_line(tmp_path, capsys, argv, needle):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"recipe": "not-a-recipe", "stages": {"train": {}}}))
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert needle in one_line_error(capsys, argv)
    with pytest.raises(Exception, match=needle):  # --debug: the exception itself, for its traceback
        main([*argv, "--debug"])


def test_a_study_result_reads_back_with_its_batch_keys(tmp_path):
    result = {"rows": [{"fp32_ms": {8: 1.5, 1: 0.2}, "tag": "plain_0.6"}], "settings": {"batches": [8, 1]},
              "timings": {"points/plain_0.6": 3.0}}
    (tmp_path / "study.json").write_text(json.dumps(result))
    assert read_result(tmp_path) == result


def test_invocation_is_the_command_typed_again():
    assert invocation(["--recipe", "r.yaml", "--set", "a.b=1 2"]) == "python compress.py --recipe r.yaml --set 'a.b=1 2'"
    assert invocation(["--recipe", "r.yaml"], world_size=2) == "torchrun --nproc_per_node 2 compress.py --recipe r.yaml"


def test_scale_moves_puts_the_scale_qat_moved_most_first():
    torch.manual_seed(0)
    plain = reparameterize(RepVGG([1, 1, 1, 1], widths=[8, 8, 16, 16, 32], num_classes=10).eval())
    x = torch.randn(16, 3, 16, 16)
    ptq = quantize_model(plain, [(x, None)], x[:1], calibration_size=16)
    moved = copy.deepcopy(ptq)
    key = next(k for k in moved.state_dict() if "conv/conv2d/2__1" in k and k.endswith(".scale"))
    with torch.no_grad():
        moved.state_dict()[key].mul_(2)  # as if QAT had doubled that layer's weight scales
    moves = scale_moves(ptq, moved)
    assert len(moves) == len(quantizer_scales(ptq))
    first = moves[0]
    assert (first.node, first.kind, first.scales) == ("conv/conv2d/2", "weight", 16)
    assert first.median == first.largest == pytest.approx(1.0) and first.after == pytest.approx(2 * first.before)
    assert all(m.largest == 0 for m in moves[1:])


# ---- on a finished tiny run (train, reparam, QAT, export) ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("cli")
    recipe = {**TINY, "stages": ["train", "reparam", "quantize", "export"], "train": {"epochs": 1, "lr": 0.05},
              "quantize": {"mode": "qat", "epochs": 1, "lr": 1e-4, "calibration_size": 64}}
    path = write_recipe(tmp / "tiny.yaml", recipe)
    out = tmp / "run"
    assert main(["--recipe", str(path), "--out", str(out)]) == 0
    return path, out


def test_report_republishes_a_run_with_the_command_that_measured_it(tiny_run, tmp_path, capsys):
    recipe, out = tiny_run
    summary = json.loads((out / "summary.json").read_text())
    record = summary["run"]
    assert record["command"] == f"python compress.py --recipe {recipe} --out {out}"
    assert record["machine"]["threads"] == 1 and record["recipe"]["name"] == "tiny"
    report_md = (out / "report.md").read_text()

    assert main(["report", str(out), "--to", str(tmp_path / "results" / "tiny.md"), "--title", "Tiny run"]) == 0
    published = (tmp_path / "results" / "tiny.md").read_text()
    lines = published.splitlines()
    assert lines[0] == "# Tiny run"
    assert lines[2] == f"- command: `{record['command']}`"
    assert lines[3] == f"- date: {record['date']}"
    assert lines[4].startswith(f"- CPU: {record['machine']['cpu']}") and lines[4].endswith(", 1 threads")
    assert lines[5].startswith("- packages: python ")
    assert published.endswith(report_md.partition("\n")[2].lstrip("\n"))  # the same report, under its header
    assert "| plain_int8 |" in published
    assert (out / "report.md").read_text() == report_md  # re-written from the run's files, the same

    # a run that recorded no command: the plain recipe command, rebuilt and marked
    del summary["run"]
    (out / "summary.json").write_text(json.dumps(summary))
    try:
        assert "records no recipe" in one_line_error(capsys, ["report", str(out)])
        assert main(["report", str(out), "--recipe", str(recipe), "--to", str(tmp_path / "old.md")]) == 0
    finally:
        (out / "summary.json").write_text(json.dumps({**summary, "run": record}))
    command = (tmp_path / "old.md").read_text().splitlines()[2]
    assert command.startswith(f"- command: `python compress.py --recipe {recipe} --out {out}  # reconstructed")


def test_int8_diagnosis_of_a_run_sorts_layers_by_loss_and_scales_by_move(tiny_run, tmp_path, capsys):
    _, out = tiny_run
    capsys.readouterr()
    assert main(["int8-diagnosis", str(out), "--images", "100"]) == 0
    text = capsys.readouterr().out
    head = re.match(r".* \(plain\.pt\): FP32 ([\d.]+)%, PTQ ([\d.]+)%, QAT ([\d.]+)% top-1 in PyTorch on 100 test images",
                    text)
    assert head, text
    ptq = float(head[2])
    rows = re.findall(r"^\| (\d) \| (\S+) \| (\d+) \| ([\d.]+) \| ([+-][\d.]+) \|$", text, re.MULTILINE)
    assert [r[1] for r in sorted(rows)] == [f"conv/conv2d/{i}" for i in range(5)] + ["linear/linear/0"]
    gains = [float(r[4]) for r in rows]
    assert gains == sorted(gains, reverse=True)  # the layer whose quantization costs most first
    assert all(float(r[4]) == pytest.approx(float(r[3]) - ptq, abs=0.011) for r in rows)
    scales = re.findall(r"^\| (\S+) \| (weight|activation) \| \d+ \| ([\d.]+) \|", text, re.MULTILINE)
    assert {n for n, kind, _ in scales if kind == "weight"} == {r[1] for r in rows}
    assert [float(m) for *_, m in scales] == sorted((float(m) for *_, m in scales), reverse=True)



def test_int8_diagnosis_finds_a_study_point_and_its_recipe(tiny_run, tmp_path, capsys):
    recipe_path, out = tiny_run
    study = tmp_path / "study"
    (study / "points").mkdir(parents=True)
    (study / "points" / "plain_0.5").symlink_to(out)
    assert "name a point with --point (points: plain_0.5)" in one_line_error(capsys, ["int8-diagnosis", str(study)])
    line = one_line_error(capsys, ["int8-diagnosis", str(study), "--point", "plain_0.3"])
    assert "no point 'plain_0.3'" in line
    summary = json.loads((out / "summary.json").read_text())
    run_dir, recipe = _diagnosed_run(parser().parse_args(["int8-diagnosis", str(study), "--point", "plain_0.5"]))
    assert run_dir == study / "points" / "plain_0.5"
    assert recipe.model_dump(mode="json") == summary["run"]["recipe"]

    # a point that recorded no recipe: a pruned point's is rebuilt from the study's recipe, as the study builds it
    for name in ("plain_0.4", "scratch_0.4"):
        (study / "points" / name).mkdir()
        (study / "points" / name / "summary.json").write_text(json.dumps({**summary, "run": {}}))
    argv = ["int8-diagnosis", str(study), "--point", "plain_0.4", "--recipe", str(recipe_path)]
    _, rebuilt = _diagnosed_run(parser().parse_args(argv))
    assert rebuilt.prune.keep_macs == 0.4 and rebuilt.prune.mode == "plain" and rebuilt.train == recipe.train
    line = one_line_error(capsys, [*argv[:3], "scratch_0.4", *argv[4:]])
    assert "records no recipe and 'scratch_0.4' is not a pruned point" in line
