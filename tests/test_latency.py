"""Latency-targeted pruning: the cost models, the budget search on a hand-made latency function (checked against
brute force), the one-target recipe rule, and real latency tables on a tiny plain model (ONNX Runtime): their
build, cache, rank-0 building under gloo, and pruning with them."""

import itertools
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch_pruning as tp
import yaml

from compress.bench import openvino_unavailable
from compress.prune import load_or_build_table, print_latency_table, prune_model
from compress.prune.budget import select_within_budget
from compress.prune.cost import LatencyCost, MacCost
from compress.prune.latency_table import LatencyTable, LayerShape
from compress.prune.slots import plain_specs, slots_of
from compress.prune.timing import above_trend
from compress.recipe import PruneCfg, Recipe, RecipeError, load_recipe, validate_recipe
from repvgg import LayerSpec, PlainRepVGG, RepVGG, reparameterize

SIZE = 16
SPECS = [LayerSpec(3, 16, 2, 1), LayerSpec(16, 32, 2, 1), LayerSpec(32, 32, 1, 1), LayerSpec(32, 64, 2, 1)]
QUICK = {"threads": 1, "rounds": 1, "grid_points": 3, "batch": 2}  # a real table in about a second


def tiny_plain(seed: int = 0) -> PlainRepVGG:
    torch.manual_seed(seed)
    return PlainRepVGG(SPECS, 10).eval()


def latency_cfg(cache, **latency) -> PruneCfg:
    return PruneCfg(round_to=8, keep_latency=0.6, latency={**QUICK, "cache_dir": str(cache), **latency})


# ---- cost models --------------------------------------------------------------------------------------------------
def test_mac_cost_counts_what_torch_pruning_counts_on_the_built_model():
    model, example = tiny_plain(), torch.randn(1, 3, SIZE, SIZE)
    widths = (16, 24, 8, 40)
    specs = [LayerSpec(c, w, s.stride, s.groups) for s, c, w in zip(SPECS, (3, *widths[:-1]), widths)]
    built = PlainRepVGG(specs, 10)
    assert MacCost(model, example).cost(widths) == tp.utils.count_ops_and_params(built, example)[0]


def synthetic_table(groups_last: int = 1) -> LatencyTable:
    """A table of hand-set grids: each plain layer of `tiny_plain` has its own shape and numbers."""
    rng = np.random.default_rng(0)
    shapes, size = [], SIZE
    axes = [[8, 16], [8, 16, 24, 32], [8, 16, 24, 32], [8, 16, 24, 32, 40, 48, 56, 64]]
    for spec, cin, cout in zip(SPECS, [[3], *axes[:-1]], axes):
        ms = np.cumsum(np.cumsum(rng.uniform(0.1, 1.0, (len(cin), len(cout))), 0), 1)
        shapes.append(LayerShape(size, spec.stride, spec.groups, cin == [3], cin, cout, ms.tolist(), ms.tolist()))
        size = (size - 1) // spec.stride + 1
    return LatencyTable({}, shapes, list(range(len(SPECS))), 3, scale=1.3, offset=0.25)


def bilinear(shape: LayerShape, cin: int, cout: int) -> float:
    return float(np.interp(cin, shape.cin, [np.interp(cout, shape.cout, row) for row in shape.ms]))


def test_latency_cost_is_the_calibrated_sum_of_interpolated_layers():
    table = synthetic_table()
    cost = LatencyCost(table, tiny_plain())
    widths = (16, 24, 8, 48)  # 24 and 48 lie on the grids; the image's 3 channels too
    io = list(zip((3, *widths[:-1]), widths))
    direct = 0.25 + 1.3 * sum(bilinear(s, a, b) for s, (a, b) in zip(table.shapes, io))
    assert cost.cost(widths) == pytest.approx(direct, rel=1e-12)
    assert table.predict_ms(io) == pytest.approx(direct, rel=1e-12)
    table.shapes[3].cout = [8, 32, 64]  # a coarser grid: 48 sits between 32 and 64
    table.shapes[3].ms = [[row[0], row[3], row[7]] for row in table.shapes[3].ms]
    halfway = (table.shapes[3].ms[0][1] + table.shapes[3].ms[0][2]) / 2  # cin 8, cout 48
    assert table.layer_ms(3, 8, 48) == pytest.approx(halfway)
    assert sum(cost.slot_cost(i, widths[i - 1] if i else None, w) for i, w in enumerate(widths)) + 0.25 == \
        pytest.approx(cost.cost(widths))


def test_latency_cost_of_a_multibranch_model_expands_stages_into_layers():
    model = RepVGG([2, 1, 1, 1], widths=[8, 16, 16, 32, 32], num_classes=10)
    specs = plain_specs(model)  # 3->8 | 8->16, 16->16 | 16->16 | 16->32 | 32->32
    shapes = [LayerShape(1, 1, 1, i == 0, [s.in_channels], [s.out_channels], [[i + 1.0]], [[i + 1.0]])
              for i, s in enumerate(specs)]
    table = LatencyTable({}, shapes, list(range(len(specs))), 3)
    cost = LatencyCost(table, model)
    assert cost.cost((8, 16, 16, 32, 32)) == 1 + 2 + 3 + 4 + 5 + 6
    assert cost.slot_cost(1, 8, 16) == 2 + 3  # stage1's two layers: 8->16, then 16->16


# ---- the budget search on a hand-made chain --------------------------------------------------------------------
class StepLatency:
    """A latency with plateaus: each layer costs by the 32-channel blocks it touches, so 40 and 64 cost the same."""

    unit = "ms"

    def __init__(self, weights: list[float]):
        self.weights = weights

    def slot_cost(self, i, width_in, width):
        blocks_in = 1 if width_in is None else math.ceil(width_in / 32)
        return self.weights[i] * blocks_in * math.ceil(width / 32)

    def cost(self, widths):
        return 0.5 + sum(self.slot_cost(i, widths[i - 1] if i else None, w) for i, w in enumerate(widths))


def brute_force(choices, kept, cost, budget):
    best = None
    for pick in itertools.product(*(range(len(c)) for c in choices)):
        widths = tuple(c[k] for c, k in zip(choices, pick))
        if cost.cost(widths) <= budget:
            value = sum(v[k] for v, k in zip(kept, pick))
            best = value if best is None else max(best, value)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_budget_search_matches_brute_force_and_takes_plateaus_at_their_widest(seed):
    rng = np.random.default_rng(seed)
    choices = [list(range(16, 97, 8)) for _ in range(3)]
    kept = [np.cumsum(rng.uniform(0.1, 2.0, len(c))).tolist() for c in choices]  # importance grows with width
    cost = StepLatency(rng.uniform(0.5, 2.0, 3).tolist())
    full = cost.cost([c[-1] for c in choices])
    budget = float(rng.uniform(0.3, 0.8)) * full
    widths = select_within_budget(choices, kept, cost, budget, "prune.keep_latency=x")
    assert cost.cost(widths) <= budget
    value = sum(v[c.index(w)] for v, c, w in zip(kept, choices, widths))
    assert value == pytest.approx(brute_force(choices, kept, cost, budget))
    for i, w in enumerate(widths):  # no slot could be wider at the same latency
        if w < choices[i][-1]:
            wider = list(widths)
            wider[i] = choices[i][choices[i].index(w) + 1]
            assert cost.cost(wider) > cost.cost(widths)
    assert all(w % 32 == 0 or w == choices[i][-1] for i, w in enumerate(widths))  # plateaus end at 32-multiples


def test_budget_below_the_narrowest_widths_fails_in_one_line():
    choices = [[16, 32], [16, 32]]
    with pytest.raises(ValueError, match=r"^prune\.target_ms=0\.1 is not reachable: the narrowest widths allowed cost "
                                         r"2\.5 ms, over the budget of 0\.1 ms [^\n]*$"):
        select_within_budget(choices, [[1, 2], [1, 2]], StepLatency([1.0, 1.0]), 0.1, "prune.target_ms=0.1")


# ---- the recipe's one-target rule ---------------------------------------------------------------------------------
def test_one_target_given_alone_needs_no_nulls(tmp_path):
    assert PruneCfg().keep_macs == 0.5  # no target: keep_macs' default
    cfg = PruneCfg(keep_latency=0.4)
    assert (cfg.keep_macs, cfg.keep_latency, cfg.latency_target) == (None, 0.4, True)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": "A0"}}))
    loaded = load_recipe(recipe, ["prune.target_ms=12.5"])
    assert (loaded.prune.keep_macs, loaded.prune.target_ms) == (None, 12.5)
    # the validated recipe round-trips (the study re-validates dumped recipes)
    assert validate_recipe(loaded.model_dump(mode="json")).prune == loaded.prune


@pytest.mark.parametrize("given", [("keep_macs", "keep_latency"), ("channel_ratio", "target_ms"),
                                   ("keep_latency", "target_ms")])
def test_two_targets_are_one_line_naming_both(given):
    values = {"keep_macs": 0.5, "channel_ratio": 0.3, "keep_latency": 0.5, "target_ms": 10.0}
    with pytest.raises(RecipeError) as err:
        validate_recipe({"name": "r", "model": {"name": "A0"}, "prune": {k: values[k] for k in given}})
    message = str(err.value)
    assert "\n" not in message and message.startswith("prune: ") and all(name in message for name in given)


def test_latency_settings_change_the_prune_key_only_under_a_latency_target():
    macs = PruneCfg(keep_macs=0.5)
    assert "latency" not in macs.key_values("weights")
    assert PruneCfg(keep_macs=0.5, latency={"threads": 1}).key_values("weights") == macs.key_values("weights")
    lat = PruneCfg(keep_latency=0.5, latency={"threads": 1})
    assert lat.key_values("weights")["latency"]["threads"] == 1
    moved = PruneCfg(keep_latency=0.5, latency={"threads": 1, "cache_dir": "/elsewhere"})
    assert moved.key_values("weights") == lat.key_values("weights")  # the cache's place changes nothing


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


# ---- real tables --------------------------------------------------------------------------------------------------
def test_small_table_build_reports_its_error_and_prunes_within_budget(tmp_path, capsys):
    model = tiny_plain()
    cfg = latency_cfg(tmp_path)
    table = load_or_build_table(model, cfg, SIZE, log=lambda line: None)
    assert table.measured > 0 and table.path.is_file() and table.build_s > 0
    assert [len(s.cin) for s in table.shapes] == [1, 2, 3, 3]  # the image; axis [8, 16]; 3 of 4 widths
    assert table.held_out["layer_points"] > 0 and table.held_out["layer_mean_abs_error"] >= 0
    assert set(table.held_out["models"]) == {"random0", "random1"}
    cal = table.calibration
    unpruned = [(s.in_channels, s.out_channels) for s in SPECS]
    assert table.predict_ms(unpruned) == pytest.approx(cal["unpruned_measured_ms"])
    for s in table.shapes:  # no wider point is cheaper
        ms = np.array(s.ms)
        assert (np.diff(ms, axis=0) >= 0).all() and (np.diff(ms, axis=1) >= 0).all()
    # a budget halfway between the narrowest widths allowed and the unpruned model: reachable, and a real cut
    cost, slots = LatencyCost(table, model), slots_of(model, cfg, 8)
    narrowest, unpruned = cost.cost([s.choices()[0] for s in slots]), cost.cost([s.init for s in slots])
    keep = (narrowest + unpruned) / 2 / unpruned
    report = prune_model(model, cfg.model_copy(update={"keep_latency": keep}), torch.randn(1, 3, SIZE, SIZE),
                         latency_table=table)
    latency = report["latency"]
    assert latency["budget_ms"] == pytest.approx(keep * latency["before_ms"])
    assert latency["predicted_ms"] <= latency["budget_ms"]
    assert latency["before_ms"] == pytest.approx(cal["unpruned_measured_ms"])
    assert latency["table"]["calibration"] == cal and report["widths_after"] != report["widths_before"]
    assert all(w % 8 == 0 for w in report["widths_after"])

    recipe = Recipe(name="t", model={"name": "A0"}, data={"image_size": SIZE}, prune=cfg)
    assert print_latency_table(recipe, tiny_plain()).measured == 0  # the CLI's view reads the same table back
    text = capsys.readouterr().out
    assert "held-out layers:" in text and "held-out model random0" in text and "calibration:" in text
    rows = [line.split()[0] for line in text.splitlines() if re.match(r"\s+\d+\s+\d+->\d+, s\d, g\d @", line)]
    assert rows == [str(i) for i in range(len(SPECS))]  # one row per layer


def test_multibranch_prune_to_a_latency_budget_keeps_stages_whole_and_reparam_exact(tmp_path):
    torch.manual_seed(0)
    model = RepVGG([2, 1, 1, 1], widths=[16, 32, 32, 64, 64], num_classes=10).eval()
    cfg = latency_cfg(tmp_path).model_copy(update={"mode": "multibranch"})
    table = load_or_build_table(model, cfg, SIZE, log=lambda line: None)
    assert len(table.layers) == 6  # one per block: the plain stack it re-parameterizes into
    cost, slots = LatencyCost(table, model), slots_of(model, cfg, 8)
    narrowest, unpruned = cost.cost([s.choices()[0] for s in slots]), cost.cost([s.init for s in slots])
    report = prune_model(model, cfg.model_copy(update={"keep_latency": None, "target_ms": (narrowest + unpruned) / 2}),
                         torch.randn(1, 3, SIZE, SIZE), latency_table=table)
    widths = report["widths_after"]
    assert widths[1] == widths[2] and sum(widths) < sum(report["widths_before"])  # stage1's blocks stay tied
    assert report["latency"]["predicted_ms"] <= report["latency"]["budget_ms"] == (narrowest + unpruned) / 2
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(reparameterize(model)(x), model(x), atol=1e-5)


def test_cache_is_reused_and_rebuilt_when_its_key_changes(tmp_path):
    model = tiny_plain()
    first = load_or_build_table(model, latency_cfg(tmp_path), SIZE, log=lambda line: None)
    written = first.path.stat().st_mtime_ns
    again = load_or_build_table(model, latency_cfg(tmp_path), SIZE, log=lambda line: None)
    assert again.measured == 0 and again.path == first.path and again.path.stat().st_mtime_ns == written
    assert again.shapes == first.shapes and (again.scale, again.offset) == (first.scale, first.offset)
    for changed in (latency_cfg(tmp_path, threads=2), latency_cfg(tmp_path).model_copy(update={"round_to": 16})):
        other = load_or_build_table(model, changed, SIZE, log=lambda line: None)
        assert other.measured > 0 and other.path != first.path
    assert len(list(tmp_path.glob("latency-*.json"))) == 3


@pytest.mark.skipif(openvino_unavailable() is not None, reason="OpenVINO is not installed")
def test_openvino_table(tmp_path):
    table = load_or_build_table(tiny_plain(), latency_cfg(tmp_path, provider="openvino", precision="fp32"), SIZE,
                                log=lambda line: None)
    assert table.key["runtime"].startswith("openvino ") and table.measured > 0
    assert all(ms > 0 for s in table.shapes for row in s.ms for ms in row)


def _build_on_rank(rank: int, out_dir) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=2)
    try:
        table = load_or_build_table(tiny_plain(), latency_cfg(out_dir / "cache"), SIZE, rank=rank, wait=dist.barrier,
                                    log=lambda line: None)
        (out_dir / f"rank{rank}.json").write_text(json.dumps({"measured": table.measured, "table": table.to_json()}))
    finally:
        dist.destroy_process_group()


def test_rank0_builds_the_table_while_the_other_rank_waits_then_reads_it(tmp_path):
    mp.spawn(_build_on_rank, args=(tmp_path,), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["measured"] > 0 and ranks[1]["measured"] == 0  # rank 1 timed nothing
    assert ranks[0]["table"] == ranks[1]["table"]


# ---- wiring: --set over a recipe's target, the CLI subcommand, the prune and bench stages -------------------------
def test_set_target_replaces_the_recipe_files_and_two_set_targets_collide(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": "A0"}, "prune": {"keep_macs": 0.5}}))
    loaded = load_recipe(recipe, ["prune.keep_latency=0.5"])  # as on bench_a0_cpu.yaml, which names keep_macs
    assert (loaded.prune.keep_macs, loaded.prune.keep_latency) == (None, 0.5)
    with pytest.raises(RecipeError, match="keep_latency and target_ms given together"):
        load_recipe(recipe, ["prune.keep_latency=0.5", "prune.target_ms=3"])


def test_latency_table_subcommand_prints_the_table(tiny_recipe, tmp_path, capsys):
    from compress.cli import main

    args = ["latency-table", "--recipe", str(tiny_recipe()), "--set", "prune.keep_latency=0.5",
            "--set", "prune.round_to=8", *(f"--set=prune.latency.{k}={v}" for k, v in QUICK.items()),
            "--set", f"prune.latency.cache_dir={tmp_path}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"latency table: onnxruntime \S+ \(cpu\), fp32, batch 2, threads 1", out)
    assert re.search(r"held-out layers: \d+ off-grid widths, error mean [\d.]+%", out)
    assert len(list(tmp_path.glob("latency-*.json"))) == 1


def test_pipeline_prunes_to_keep_latency_and_bench_measures_the_prediction(tiny_recipe, tmp_path, capsys):
    from compress.cli import main

    out = tmp_path / "run"
    recipe = tiny_recipe(
        stages=["train", "reparam", "prune", "export", "bench"], train={"epochs": 1},
        model={"width_multiplier": [1, 1, 1, 0.5]},  # wide enough that convs, not call overheads, take the time
        data={"train_subset": 256, "test_subset": 64},
        prune={"keep_latency": 0.7, "round_to": 8, "latency": {**QUICK, "cache_dir": str(tmp_path / "cache")}},
        bench={"batch_sizes": [2], "warmup": 2, "iters": 10, "rounds": 3, "threads": 1, "providers": ["cpu"]},
    )
    assert main(["--recipe", str(recipe), "--out", str(out)]) == 0
    stages = json.loads((out / "summary.json").read_text())["stages"]
    latency = stages["prune"]["latency"]
    assert latency["predicted_ms"] <= latency["budget_ms"] == pytest.approx(0.7 * latency["before_ms"])
    check = stages["bench"]["prune_latency"]
    assert (check["artifact"], check["provider"], check["batch"]) == ("pruned_fp32", "cpu", 2)
    assert check["predicted_ms"] == latency["predicted_ms"] and check["measured_ms"] > 0
    assert "Latency target (pruned_fp32, ORT CPU, batch 2): budget" in capsys.readouterr().out
