"""What a run shows in TensorBoard, read back from its event files with TensorBoard's own EventAccumulator."""

import json
import re

import pytest
from conftest import TINY, write_recipe
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter

from compress.cli import main
from compress.figures import accuracy_latency_figure
from compress.report import accuracy_caveats
from compress.tensorboard_log import (
    HPARAMS,
    LATENCY_METRIC,
    TOP1_METRIC,
    hparams,
    log_accuracy_latency,
    log_prune,
    runtime_tag,
    split_tables,
)

BATCHES = (1, 4)


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    """A tiny run of every stage: prune, a one-epoch fine-tune and QAT, export, bench at two batch sizes."""
    root = tmp_path_factory.mktemp("tb")
    recipe = {**TINY, "train": {"epochs": 1, "lr": 0.05}, "prune": {"keep_macs": 0.5, "round_to": 4},
              "finetune": {"epochs": 1, "lr": 0.01},
              "quantize": {"mode": "qat", "epochs": 1, "lr": 1e-4, "calibration_size": 64},
              "bench": {"batch_sizes": list(BATCHES), "warmup": 1, "iters": 3, "rounds": 2, "providers": ["cpu", "torch"]}}
    out = root / "run"
    assert main(["--recipe", str(write_recipe(root / "tiny.yaml", recipe)), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())["stages"]
    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return out, summary, events


def _timed(summary) -> dict:
    """{(artifact, runtime tag, batch): fastest call in ms} of the run's bench."""
    return {(r["artifact"], runtime_tag(r["provider"]), r["batch"]): r["fastest_ms"]
            for r in summary["bench"]["results"]}


def _hparams_entry(path):
    events = EventAccumulator(str(path), size_guidance={"scalars": 0})
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    hparams = {k: v.string_value if v.HasField("string_value") else v.number_value for k, v in start.hparams.items()}
    metrics = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    return hparams, metrics


def test_hparams_one_entry_per_file_runtime_and_batch_with_the_same_names(run):
    out, summary, _ = run
    timed, artifacts = _timed(summary), summary["export"]["artifacts"]
    assert {runtime for _, runtime, _ in timed} == {"ort_cpu", "torch_cpu"}
    entries = {}
    for path in (out / "tb" / "hparams").iterdir():
        hp, metrics = _hparams_entry(path)
        assert set(hp) == set(HPARAMS)  # every entry the same names: TensorBoard hides columns otherwise
        assert (hp["strategy"], hp["keep"], hp["seed"]) == ("-", -1, -1)  # a pipeline run: placeholders
        key = (hp["artifact"], hp["runtime"], int(hp["batch"]))
        assert key not in entries
        entries[key] = metrics
        assert metrics[TOP1_METRIC] == [pytest.approx(artifacts[hp["artifact"]]["top1"], abs=1e-4)]
        assert metrics[LATENCY_METRIC] == [pytest.approx(timed[key], rel=1e-6)]
        assert hp["macs_M"] == pytest.approx(artifacts[hp["artifact"]]["macs"] / 1e6)
        assert hp["precision"] == hp["artifact"].rsplit("_", 1)[1]
    assert set(entries) == set(timed)


def test_every_file_is_a_dot_of_its_accuracy_vs_latency_card_at_latency_in_microseconds(run):
    out, summary, events = run
    timed, artifacts = _timed(summary), summary["export"]["artifacts"]
    # TensorBoard draws a one-point series as a dot and a longer one as a bare line: each file's point is alone
    # in its HParams entry's run, which names it
    assert not any(t.startswith("accuracy_vs_latency/") for t in events.Tags()["scalars"])
    cards: dict[str, list] = {}
    for path in (out / "tb" / "hparams").iterdir():
        hp, metrics = _hparams_entry(path)
        [(tag, points)] = [(t, v) for t, v in metrics.items() if t.startswith("accuracy_vs_latency/")]
        key = (hp["artifact"], hp["runtime"], int(hp["batch"]))
        assert tag == f"accuracy_vs_latency/{hp['runtime']}_b{int(hp['batch'])}_{hp['precision']}"
        assert points == [pytest.approx(artifacts[hp["artifact"]]["top1"], abs=1e-4)]
        events_of_run = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events_of_run.Reload()
        assert [e.step for e in events_of_run.Scalars(tag)] == [round(timed[key] * 1000)]
        assert "one dot per file" in events_of_run.SummaryMetadata(tag).summary_description
        cards.setdefault(tag, []).append(hp["artifact"])
    assert {f"accuracy_vs_latency/{rt}_b{b}_{name.rsplit('_', 1)[1]}" for name, rt, b in timed} == set(cards)
    assert all(len(files) >= 2 for files in cards.values()), cards  # every card compares files


def test_a_rebench_replaces_an_entry_and_a_run_without_entries_draws_curves(tmp_path):
    entry = {"name": "plain_fp32_ort_cpu_b1", "top1": 90.0, "latency_ms": 0.5,
             "hparams": hparams(artifact="plain_fp32", precision="fp32", runtime="ort_cpu", batch=1)}
    with SummaryWriter(str(tmp_path)) as writer:
        log_accuracy_latency(writer, [entry])
        log_accuracy_latency(writer, [{**entry, "top1": 91.0, "latency_ms": 0.4}])
        log_accuracy_latency(writer, [{**entry, "name": "b", "latency_ms": 0.3}, entry], run_prefix=None)
    _, metrics = _hparams_entry(tmp_path / "hparams" / "plain_fp32_ort_cpu_b1")
    assert metrics["accuracy_vs_latency/ort_cpu_b1_fp32"] == [91.0] and metrics[LATENCY_METRIC] == [pytest.approx(0.4)]
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("accuracy_vs_latency/ort_cpu_b1_fp32")] == [(300, 90.0),
                                                                                                    (500, 90.0)]


def test_every_latency_tag_names_its_runtime_and_the_batch_it_was_timed_at(run):
    _, summary, events = run
    timed = _timed(summary)
    tags = [t for t in events.Tags()["scalars"] if "latency" in t and not t.startswith("accuracy_vs_latency/")]
    assert len(tags) == len(timed)
    for tag in tags:
        name, runtime, batch = re.fullmatch(r"bench/latency_ms/(\w+?)_((?:ort|torch|openvino)_\w+?)_b(\d+)",
                                            tag).groups()
        assert [e.value for e in events.Scalars(tag)] == [pytest.approx(timed[(name, runtime, int(batch))])]


def test_training_curves_at_step_resolution_and_every_scalar_described(run):
    _, summary, events = run
    scalars = events.Tags()["scalars"]
    for tag in ("train", "finetune", "qat"):
        steps = [e.step for e in events.Scalars(f"{tag}/train_loss")]
        assert len(steps) > 1 and steps == sorted(steps) and steps[0] == TINY["data"]["batch_size"]  # images seen
        assert [e.step for e in events.Scalars(f"{tag}/top1")] == [steps[-1]]  # top-1 after the epoch
    assert [e.value for e in events.Scalars("prune/top1_before_finetune")] == [pytest.approx(summary["prune"]["top1"])]
    assert [e.value for e in events.Scalars("prune/top1_after_finetune")] == [pytest.approx(summary["finetune"]["top1"])]
    for tag in scalars:
        assert events.SummaryMetadata(tag).summary_description, tag


def test_text_is_rounded_and_its_tables_fit(run):
    _, _, events = run
    texts = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]
             if tag.endswith("text_summary")}
    assert {"report/text_summary", "summary/export/text_summary"} <= set(texts)
    for tag, text in texts.items():
        widths = [line.count("|") - 1 for line in text.splitlines() if line.startswith("|")]
        assert widths and max(widths) <= 7, tag
        # rounded as the result table rounds: two decimals, three significant digits below 0.01; never 98.44444444444444
        assert not re.search(r"[1-9]\d*\.\d{3,}|\.\d{7,}", text), tag
    assert "Caution: top-1 of" in texts["report/text_summary"]  # 450 test images: fewer than 1,000


def test_a_latency_target_logs_every_round_on_one_chart(tmp_path):
    report = {"widths_before": [8, 8], "widths_after": [4, 6],
              "latency": {"before_ms": 2.0, "budget_ms": 1.0, "predicted_ms": 0.95, "rounds": [
                  {"budget_ms": 1.0, "predicted_ms": 0.98, "measured_ratio": 0.6, "target_ratio": 0.5,
                   "unpruned_ms": 2.1},
                  {"budget_ms": 0.83, "predicted_ms": 0.82, "measured_ratio": 0.51, "target_ratio": 0.5,
                   "unpruned_ms": 2.1}]}}
    with SummaryWriter(str(tmp_path)) as writer:
        log_prune(writer, report, 50.0, "ort_cpu", 8)
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    card = {t: [(e.step, round(e.value, 4)) for e in events.Scalars(t)] for t in events.Tags()["scalars"]
            if t.startswith("prune/latency_target/")}
    assert card == {"prune/latency_target/budget_ms_ort_cpu_b8": [(1, 1.0), (2, 0.83)],
                    "prune/latency_target/predicted_ms_ort_cpu_b8": [(1, 0.98), (2, 0.82)],
                    "prune/latency_target/measured_ms_ort_cpu_b8": [(1, 1.26), (2, 1.071)],
                    "prune/latency_target/target_ms_ort_cpu_b8": [(1, 1.05), (2, 1.05)]}
    layout = events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    assert b"prune/latency_target/.*" in layout  # one Custom Scalars chart holds every series


def test_split_tables_keeps_the_name_column_and_every_cell():
    header = "| artifact | " + " | ".join(f"c{i}" for i in range(12)) + " |"
    row = "| plain_int8 | " + " | ".join(str(i) for i in range(12)) + " |"
    text = split_tables(f"before\n{header}\n|{'---|' * 13}\n{row}\nafter", max_columns=5)
    tables = [t for t in text.split("\n\n")]
    assert text.startswith("before\n") and text.endswith("\nafter") and len(tables) == 3
    assert all(line.startswith(("| artifact |", "| --- |", "| plain_int8 |")) for t in tables
               for line in t.splitlines() if line.startswith("|"))
    cells = re.findall(r"\| (\d+) ", text)
    assert sorted(map(int, cells)) == list(range(12))


def test_split_tables_cuts_long_headers_so_names_do_not_break():
    # five long headers in one 6-column table squeeze the name column until "train_fp32" breaks mid-word
    names = ["x vs plain_fp32 (ORT CPU)", "PyTorch fastest call ms @8", "x vs plain_fp32 (PyTorch)",
             "fastest runtime", "stem share (ORT CPU profile)"]
    table = f"| artifact | {' | '.join(names)} |\n|{'---|' * 6}\n| train_fp32 | 0.97 | 131.20 | 0.57 | ORT CPU | - |"
    tables = split_tables(table).split("\n\n")
    assert len(tables) == 2
    for t in tables:
        header = t.splitlines()[0].strip("| ").split(" | ")
        assert header[0] == "artifact" and sum(map(len, header[1:])) <= 100
    assert "\n\n" not in split_tables(table, max_header_chars=1000)  # within both limits: one table


def test_caveats_name_few_images_and_near_chance():
    artifacts = {"plain_fp32": {"top1": 11.0, "n": 32}, "plain_int8": {"top1": 60.0, "n": 5000}}
    lines = accuracy_caveats(artifacts, 10)
    assert lines == ["top-1 of plain_fp32 comes from 32 test images (fewer than 1,000): not a result",
                     "top-1 of plain_fp32 is within 2 pt of chance (10.0% for 10 classes): the model has not learned "
                     "the task"]
    assert accuracy_caveats({"plain_int8": {"top1": 12.5, "n": 1000}}, 10) == []


def test_the_figure_says_what_it_shows():
    points = [{"name": "plain_int8", "latency_ms": 1.0, "top1": 70.0},
              {"name": "pruned_int8", "latency_ms": 1.0, "top1": 70.1},
              {"name": "plain_fp32", "latency_ms": 3.0, "top1": 72.0}]
    fig = accuracy_latency_figure(points, "ORT CPU", 8, ["top-1 from 32 test images"])
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert [line.split(":")[0] for line in legend[:3]] == [p["name"] for p in points]
    assert legend[3].startswith("Pareto front")
    assert ax.get_xlabel() == "latency (ms): fastest call on ORT CPU, batch 8"
    assert [t.get_text() for t in fig.texts] == ["top-1 from 32 test images"] and not ax.texts
    assert fig.texts[0].get_position()[1] < ax.get_position().y0  # under the plot: it hides no point
