"""Latency tables: the timing trend that singles out slowed runs, the monotone grid, the cache key, and real tables on
a tiny plain model (ONNX Runtime): their build, cache, rank-0 building under gloo, and pruning with them."""

import json
import re

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from compress.prune import LatencyOptions, PruneOptions, Target, load_or_build_table, print_latency_table, prune_model
from compress.prune.cost import LatencyCost
from compress.prune.latency_table import LayerShape
from compress.prune.slots import slots_of
from compress.prune.timing import above_trend
from compress.runtime import RUNTIMES
from repvgg import LayerSpec, PlainRepVGG, RepVGG, reparameterize

SIZE = 16
SPECS = [LayerSpec(3, 16, 2, 1), LayerSpec(16, 32, 2, 1), LayerSpec(32, 32, 1, 1), LayerSpec(32, 64, 2, 1)]
QUICK = {"threads": 1, "rounds": 1, "grid_points": 3, "batch": 2}  # a real table in about a second


def tiny_plain(seed: int = 0) -> PlainRepVGG:
    torch.manual_seed(seed)
    return PlainRepVGG(SPECS, 10).eval()


def quick_options(cache, **latency) -> LatencyOptions:
    """Quick table settings; plans trusted as predicted (verify 0) unless a test is about the measured check."""
    return LatencyOptions(**{**QUICK, "cache_dir": cache, "verify": 0, **latency})


def latency_prune(target: Target, latency: LatencyOptions, **options) -> PruneOptions:
    return PruneOptions(target=target, round_to=8, latency=latency, **options)


# ---- measured timings on a shared machine --------------------------------------------------------------------
def test_a_timing_far_above_its_peers_trend_is_singled_out():
    cin, cout = np.meshgrid([16, 32, 48, 64], [16, 32, 64, 128], indexing="ij")
    features = np.stack([np.ones(cin.size), cin.ravel(), cout.ravel(), (cin * cout).ravel()], 1)
    ms = 0.05 + 0.001 * cin.ravel() + 0.002 * cout.ravel() + 1e-4 * (cin * cout).ravel()
    assert not above_trend(ms, features).any()
    slowed = ms.copy()
    slowed[[5, 15]] *= [3.0, 1.6]  # a run that waited on a busy core, and the widest point a little slowed
    assert np.flatnonzero(above_trend(slowed, features)).tolist() == [5, 15]


def test_settle_lets_no_point_cost_more_than_a_wider_one():
    shape = LayerShape(8, 1, 1, False, [8, 16, 24], [8, 16], measured_ms=[[1.0, 5.0], [9.0, 3.0], [4.0, 8.0]])
    shape.settle()
    assert shape.ms == [[1.0, 3.0], [3.0, 3.0], [4.0, 8.0]]


def test_the_cache_key_holds_every_setting_but_where_the_cache_lies(tmp_path):
    # the keys of the tables already cached: changing them would measure every table again
    assert quick_options(tmp_path).cache_key() == {"provider": "cpu", "threads": 1, "batch": 2, "precision": "fp32",
                                                   "grid_points": 3, "rounds": 1}
    assert quick_options(tmp_path).cache_key() == quick_options(tmp_path / "elsewhere").cache_key()


# ---- real tables --------------------------------------------------------------------------------------------------
def test_small_table_build_reports_its_error_and_prunes_within_budget(tmp_path, capsys):
    model = tiny_plain()
    latency = quick_options(tmp_path)
    table = load_or_build_table(model, latency, SIZE, 8, log=lambda line: None)
    assert table.measured > 0 and table.path.is_file() and table.build_s > 0
    assert [len(s.cin) for s in table.shapes] == [1, 2, 3, 3]  # the image; axis [8, 16]; 3 of 4 widths
    assert table.held_out["layer_points"] > 0  # its error on a machine of known costs: see the hand-set test below
    assert set(table.held_out["models"]) == {"random0", "random1"}
    cal = table.calibration
    unpruned = [(s.in_channels, s.out_channels) for s in SPECS]
    assert table.predict_ms(unpruned) == pytest.approx(cal["unpruned_measured_ms"])
    for s in table.shapes:  # no wider point is cheaper
        ms = np.array(s.ms)
        assert (np.diff(ms, axis=0) >= 0).all() and (np.diff(ms, axis=1) >= 0).all()
    # a budget halfway between the narrowest widths allowed and the unpruned model: reachable, and a real cut
    cost, slots = LatencyCost(table, model), slots_of(model, PruneOptions(), 8)
    narrowest, unpruned = cost.cost([s.choices()[0] for s in slots]), cost.cost([s.init for s in slots])
    keep = (narrowest + unpruned) / 2 / unpruned
    report = prune_model(model, latency_prune(Target("keep_latency", keep), latency), torch.randn(1, 3, SIZE, SIZE),
                         latency_table=table)
    measured = report["latency"]
    assert measured["budget_ms"] == pytest.approx(keep * measured["before_ms"])
    assert measured["predicted_ms"] <= measured["budget_ms"]
    assert measured["before_ms"] == pytest.approx(cal["unpruned_measured_ms"])
    assert measured["table"]["calibration"] == cal and report["widths_after"] != report["widths_before"]
    assert all(w % 8 == 0 for w in report["widths_after"])

    assert print_latency_table(tiny_plain(), latency, SIZE, 8).measured == 0  # the CLI's view reads the same table
    text = capsys.readouterr().out
    assert "held-out layers:" in text and "held-out model random0" in text and "calibration:" in text
    rows = [line.split()[0] for line in text.splitlines() if re.match(r"\s+\d+\s+\d+->\d+, s\d, g\d @", line)]
    assert rows == [str(i) for i in range(len(SPECS))]  # one row per layer


def layer_cost_ms(layers: list[tuple[int, int, int]]) -> float:
    """The hand-set machine: 0.2 ms a call; each conv 0.01 ms per input and per output channel (memory traffic)
    and its MACs at 1 ms per 10^6 (work): bilinear in a layer's widths, as the table interpolates, so its only
    error is how it is timed and calibrated. A whole model is its convs and the same 0.2 ms."""
    return 0.2 + sum(0.01 * (a + b) + 1e-6 * a * b * 9 * s * s for a, b, s in layers)


HELD_OUT_BOUND = 0.02  # the table's mean error on held-out layers and whole models of the hand-set machine


def test_the_held_out_error_stays_under_its_bound_on_a_hand_set_machine(tmp_path, monkeypatch):
    """A real table build, its runtime faked: every call costs `layer_cost_ms` on a fake clock, a fresh session's
    first call 10x (warm-up), and 30% of calls slowed 3x by other work. Timed by the engine (each model's fastest
    call, warm-up not recorded, slowed timings timed again), the table predicts held-out layers and whole models
    within HELD_OUT_BOUND."""
    from test_timing import CostedRuntime, FakeClock, on_fake_clock

    clock = FakeClock()
    on_fake_clock(monkeypatch, clock)
    monkeypatch.setitem(RUNTIMES, "costed", CostedRuntime("costed", clock, layer_cost_ms))
    options = quick_options(tmp_path, provider="costed", rounds=2)
    table = load_or_build_table(tiny_plain(), options, SIZE, 8, log=lambda line: None)
    held = table.held_out
    assert held["layer_points"] > 0 and set(held["models"]) == {"random0", "random1"}
    assert held["layer_mean_abs_error"] < HELD_OUT_BOUND and held["model_mean_abs_error"] < HELD_OUT_BOUND
    unpruned = [(s.in_channels, s.out_channels) for s in SPECS]
    whole = layer_cost_ms([(a, b, size) for (a, b), size in zip(unpruned, (8, 4, 4, 2))])
    assert table.calibration["unpruned_measured_ms"] == pytest.approx(whole)  # its fastest call: no burst, not cold


def test_multibranch_prune_to_a_latency_budget_keeps_stages_whole_and_reparam_exact(tmp_path):
    torch.manual_seed(0)
    model = RepVGG([2, 1, 1, 1], widths=[16, 32, 32, 64, 64], num_classes=10).eval()
    latency = quick_options(tmp_path)
    table = load_or_build_table(model, latency, SIZE, 8, log=lambda line: None)
    assert len(table.layers) == 6  # one per block: the plain stack it re-parameterizes into
    cost, slots = LatencyCost(table, model), slots_of(model, PruneOptions(), 8)
    narrowest, unpruned = cost.cost([s.choices()[0] for s in slots]), cost.cost([s.init for s in slots])
    options = latency_prune(Target("target_ms", (narrowest + unpruned) / 2), latency, mode="multibranch")
    report = prune_model(model, options, torch.randn(1, 3, SIZE, SIZE), latency_table=table)
    widths = report["widths_after"]
    assert widths[1] == widths[2] and sum(widths) < sum(report["widths_before"])  # stage1's blocks stay tied
    assert report["latency"]["predicted_ms"] <= report["latency"]["budget_ms"] == (narrowest + unpruned) / 2
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(reparameterize(model)(x), model(x), atol=1e-5)


def test_cache_is_reused_and_rebuilt_when_its_key_changes(tmp_path):
    model = tiny_plain()
    first = load_or_build_table(model, quick_options(tmp_path), SIZE, 8, log=lambda line: None)
    written = first.path.stat().st_mtime_ns
    again = load_or_build_table(model, quick_options(tmp_path), SIZE, 8, log=lambda line: None)
    assert again.measured == 0 and again.path == first.path and again.path.stat().st_mtime_ns == written
    assert again.shapes == first.shapes and (again.scale, again.offset) == (first.scale, first.offset)
    for options, round_to in ((quick_options(tmp_path, threads=2), 8), (quick_options(tmp_path), 16)):
        other = load_or_build_table(model, options, SIZE, round_to, log=lambda line: None)
        assert other.measured > 0 and other.path != first.path
    assert len(list(tmp_path.glob("latency-*.json"))) == 3


@pytest.mark.skipif(RUNTIMES["openvino"].unavailable() is not None, reason="OpenVINO is not installed")
def test_openvino_table(tmp_path):
    table = load_or_build_table(tiny_plain(), quick_options(tmp_path, provider="openvino", precision="fp32"), SIZE, 8,
                                log=lambda line: None)
    assert table.key["runtime"].startswith("openvino ") and table.measured > 0
    assert all(ms > 0 for s in table.shapes for row in s.ms for ms in row)


def _build_on_rank(rank: int, out_dir) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=2)
    try:
        table = load_or_build_table(tiny_plain(), quick_options(out_dir / "cache"), SIZE, 8, rank=rank,
                                    wait=dist.barrier, log=lambda line: None)
        (out_dir / f"rank{rank}.json").write_text(json.dumps({"measured": table.measured, "table": table.to_json()}))
    finally:
        dist.destroy_process_group()


def test_rank0_builds_the_table_while_the_other_rank_waits_then_reads_it(tmp_path):
    mp.spawn(_build_on_rank, args=(tmp_path,), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["measured"] > 0 and ranks[1]["measured"] == 0  # rank 1 timed nothing
    assert ranks[0]["table"] == ranks[1]["table"]
