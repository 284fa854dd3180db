"""Measuring planned architectures against the unpruned one (`compress.prune.measure`): the unpruned architecture
timed as a candidate measures about 1, a much narrower one below it, on a tiny plain model (ONNX Runtime); and a
runtime registered in RUNTIMES is the one the options name, opened round-robin, one session at a time."""

import time

import numpy as np
import pytest
import torch

from compress.prune import LatencyOptions
from compress.prune.latency_table import LatencyTable, LayerShape
from compress.prune.measure import measure_ratios
from compress.prune.pruning import VERIFY_TOLERANCE
from compress.runtime import RUNTIMES
from repvgg import LayerSpec, PlainRepVGG

SIZE = 32  # 16 leaves the session overhead a third of the unpruned time, and the narrow ratio near 0.7
SPECS = [LayerSpec(3, 16, 2, 1), LayerSpec(16, 32, 1, 1), LayerSpec(32, 32, 2, 1), LayerSpec(32, 32, 1, 1)]
UNPRUNED, NARROW = (16, 32, 32, 32), (8, 8, 8, 8)
QUICK = LatencyOptions(threads=1, batch=2)


@pytest.fixture(scope="module")
def tiny() -> PlainRepVGG:
    torch.manual_seed(0)
    return PlainRepVGG(SPECS, 10).eval()


def test_the_unpruned_architecture_measures_about_one_and_a_narrow_one_less(tiny):
    lines = []
    out = measure_ratios(tiny, [UNPRUNED, NARROW], QUICK, SIZE, rounds=2, log=lines.append)
    same, narrow = (c["ratio"] for c in out["candidates"])
    assert abs(same - 1) < 0.3  # the same graph, timed in another session: only noise on a busy machine
    assert narrow < 0.8 * same
    assert len(lines) == 2 and lines[0].startswith("[measure] block 1 round 1/2")


def test_the_result_echoes_the_widths_and_one_rounds_ratio_is_its_fastest_calls(tiny):
    out = measure_ratios(tiny, [NARROW, (16, 16, 24, 32)], QUICK, SIZE, rounds=1)
    assert out["rounds"] == 1 and out["blocks"] == [[c["ratio"] for c in out["candidates"]]]
    assert [c["widths"] for c in out["candidates"]] == [list(NARROW), [16, 16, 24, 32]]
    assert all(c["ratio"] == pytest.approx(c["ms"] / out["unpruned_ms"]) for c in out["candidates"])


def test_widths_for_another_number_of_slots_are_refused(tiny):
    with pytest.raises(ValueError, match="give 3 slots; the model has 4"):
        measure_ratios(tiny, [(8, 8, 8)], QUICK, SIZE)


class SpinSession:
    """A model whose every call takes `ms`, spinning (a sleep wakes late, by the scheduler's whim)."""

    timing = "spin"

    def __init__(self, ms: float):
        self.ms = ms

    def step(self, x: np.ndarray):
        def call():
            end = time.perf_counter() + self.ms / 1000
            while time.perf_counter() < end:
                pass

        return call


class Recording:
    """The fake runtime: every ONNX file it opened, with the threads asked for, in order."""

    name, label, opens = "recording", "Recording", "onnx"

    def __init__(self):
        self.opened: list[tuple[str, int | None]] = []

    def unavailable(self, device="cpu", sample=None):
        return None

    def version(self):
        return "recording 1"

    def open(self, model, threads=None, device="cpu"):
        self.opened.append((model.stem, threads))
        return SpinSession(0.2)


def test_the_options_provider_and_threads_are_the_ones_timed(tiny, monkeypatch):
    runtime = Recording()
    monkeypatch.setitem(RUNTIMES, runtime.name, runtime)
    out = measure_ratios(tiny, [NARROW, UNPRUNED], LatencyOptions(provider="recording", threads=3, batch=2), SIZE,
                         rounds=2)
    # one session per model and round, round-robin, the second round starting one model later
    assert runtime.opened == [(name, 3) for name in ("unpruned", "candidate0", "candidate1",
                                                     "candidate0", "candidate1", "unpruned")]
    assert out["unpruned_ms"] >= 0.2 and all(c["ms"] >= 0.2 for c in out["candidates"])


class Bursty(Recording):
    """The fake runtime of a busy machine: every other call is slowed tenfold by other work."""

    name = "bursty"

    def open(self, model, threads=None, device="cpu"):
        calls = iter(range(10**6))
        session = SpinSession(0.2)
        step = session.step

        def slowed(x):
            call = step(x)
            return lambda: [call() for _ in range(1 if next(calls) % 2 else 10)]

        session.step = slowed
        return session


def test_a_round_takes_its_fastest_run_so_bursts_of_other_work_do_not_count(tiny, monkeypatch):
    monkeypatch.setitem(RUNTIMES, Bursty.name, Bursty())
    out = measure_ratios(tiny, [NARROW], LatencyOptions(provider="bursty", batch=2), SIZE, rounds=2)
    # each round's median would be about 1.1 ms (half the runs 0.2, half 2 ms); its fastest run is 0.2 ms
    assert 0.2 <= out["unpruned_ms"] < 0.6 and 0.2 <= out["candidates"][0]["ms"] < 0.6


def mac_table(specs: list[LayerSpec] = SPECS) -> LatencyTable:
    """A latency table of `specs` in which every layer costs its MACs, after a fixed 1 ms (the session's overhead,
    40% of the unpruned model of SPECS): hand-set, so the plans are the same on every machine (a measured table
    would leave the first plan's miss to the machine's noise)."""
    shapes, size = [], SIZE
    for spec in specs:
        cin = [spec.in_channels] if spec.in_channels == 3 else list(range(8, spec.in_channels + 1, 8))
        cout = list(range(8, spec.out_channels + 1, 8))
        out = (size - 1) // spec.stride + 1
        ms = [[1e-6 * a * b * 9 * out * out for b in cout] for a in cin]
        shapes.append(LayerShape(size, spec.stride, spec.groups, spec.in_channels == 3, cin, cout, ms, ms))
        size = out
    return LatencyTable({}, shapes, list(range(len(specs))), 3, offset=1.0)


class SlowedAtFirst(Recording):
    """The fake runtime of a machine busy at first: the candidate's first `slowed` sessions run as slow as the
    unpruned model (0.4 ms a call), then at its own 0.2 ms."""

    name = "slowed"

    def __init__(self, slowed: int):
        super().__init__()
        self.slowed = slowed

    def open(self, model, threads=None, device="cpu"):
        super().open(model, threads, device)
        if model.stem == "unpruned":
            return SpinSession(0.4)
        self.slowed -= 1
        return SpinSession(0.4 if self.slowed >= 0 else 0.2)


@pytest.mark.parametrize("slowed", [0, 2])
def test_blocks_of_rounds_are_timed_until_two_agree(tiny, monkeypatch, slowed):
    monkeypatch.setitem(RUNTIMES, "slowed", SlowedAtFirst(slowed))
    options = LatencyOptions(provider="slowed", batch=2)
    out = measure_ratios(tiny, [NARROW], options, SIZE, rounds=2, agree=0.1)
    # quiet from the start: two blocks agree; slowed through the first block: it disagrees with the second, and the
    # second and third agree on the candidate's own ratio
    assert out["agreed"] and len(out["blocks"]) == (2 if slowed == 0 else 3) and out["rounds"] == 2 * len(out["blocks"])
    assert out["candidates"][0]["ratio"] == pytest.approx(0.5, abs=0.1)
    if slowed:
        assert out["blocks"][0][0] == pytest.approx(1.0, abs=0.1)
    single = measure_ratios(tiny, [NARROW], options, SIZE, rounds=2)  # no agreement asked: one block
    assert len(single["blocks"]) == 1 and single["rounds"] == 2


def faked(unpruned_ms: float, ratio_of) -> tuple:
    """A stand-in for `measure_ratios` (the machine faked, the measurement only): every candidate's ratio from
    `ratio_of`, as two agreeing blocks; and the `agree` of every call, in order."""
    agreements = []

    def measured(_model, candidates, _options, _size, log=None, agree=None):
        agreements.append(agree)
        ratios = [ratio_of(w) for w in candidates]
        return {"unpruned_ms": unpruned_ms, "candidates": [{"widths": list(w), "ratio": r}
                                                          for w, r in zip(candidates, ratios)],
                "blocks": [ratios, ratios], "agreed": True}

    return measured, agreements


def test_a_plan_that_measures_off_target_is_planned_again_with_a_scaled_budget(tmp_path):
    """The table says the plan keeps 0.5 of the latency; the machine (faked here: the measurement only) says each
    plan costs 1.2x its prediction. The loop scales the budget down and keeps the plan that measures on target."""
    from compress.prune import PruneOptions, Target, prune_model
    from compress.prune.cost import LatencyCost

    model = PlainRepVGG(SPECS, 10).eval()
    latency = LatencyOptions(threads=1, batch=2, cache_dir=tmp_path, verify=3)
    table = mac_table()
    cost = LatencyCost(table, model)
    unpruned = cost.cost(UNPRUNED)

    measured, agreements = faked(unpruned, lambda w: 1.2 * cost.cost(w) / unpruned)
    report = prune_model(model, PruneOptions(target=Target("keep_latency", 0.6), round_to=8, latency=latency),
                         torch.randn(1, 3, SIZE, SIZE), latency_table=table, measure=measured)
    rounds = report["latency"]["rounds"]
    assert set(agreements) == {VERIFY_TOLERANCE}  # each plan timed until two blocks agree within the tolerance
    assert all(r["blocks"] == [r["measured_ratio"]] * 2 and r["agreed"] for r in rounds)
    assert len(rounds) >= 2 and rounds[0]["measured_ratio"] > 0.6 + 0.02  # the first plan missed
    assert rounds[1]["budget_ms"] == pytest.approx(rounds[0]["budget_ms"] * 0.6 / rounds[0]["measured_ratio"])
    chosen = [r for r in rounds if r.get("chosen")]
    assert len(chosen) == 1 and chosen[0]["measured_ratio"] <= 0.6 + 0.02
    assert tuple(chosen[0]["widths"]) == tuple(report["widths_after"])


# wide enough that widths in steps of 8 give plans every few hundredths of the unpruned latency apart
WIDE = [LayerSpec(3, 32, 2), LayerSpec(32, 48, 1), LayerSpec(48, 64, 2), LayerSpec(64, 64, 1), LayerSpec(64, 96, 2),
        LayerSpec(96, 96, 1)]


def true_ms(layers: list[tuple[int, int, int]]) -> float:
    """The hand-set machine: 0.6 ms a call, and each conv its MACs at 1 ms per 10^6, the convs at outputs above 8x8
    1.6 times that (memory-bound): the table (`mac_table`, every MAC alike after 1 ms) mispredicts every plan."""
    return 0.6 + sum(1e-6 * a * b * 9 * s * s * (1.6 if s > 8 else 1.0) for a, b, s in layers)


def test_the_closed_latency_loop_lands_within_its_tolerance_on_a_hand_set_machine(monkeypatch):
    """The prune stage's latency loop, its measurement real (`measure_ratios` on the timing engine) and the machine
    faked: a runtime whose calls cost `true_ms` on a fake clock, a fresh session's first call 10x, and 30% of calls
    slowed 3x by other work. The table mispredicts; the loop re-plans until a plan measures within
    VERIFY_TOLERANCE of the target, and the ratio it reports is the machine's own (fastest calls: no burst, no cold
    call counted)."""
    from test_timing import CostedRuntime, FakeClock, conv_layers, on_fake_clock

    from compress.prune import PruneOptions, Target, prune_model
    from compress.prune.onnx_layers import plain_model
    from compress.prune.slots import architecture, plain_specs

    clock = FakeClock()
    on_fake_clock(monkeypatch, clock)
    monkeypatch.setitem(RUNTIMES, "costed", CostedRuntime("costed", clock, true_ms))
    torch.manual_seed(0)
    model = PlainRepVGG(WIDE, 10).eval()
    unpruned = PlainRepVGG(WIDE, 10).eval()
    latency = LatencyOptions(provider="costed", batch=2, verify=3)
    report = prune_model(model, PruneOptions(target=Target("keep_latency", 0.8), round_to=8, latency=latency),
                         torch.randn(1, 3, SIZE, SIZE), latency_table=mac_table(WIDE))
    rounds = report["latency"]["rounds"]
    assert abs(rounds[0]["measured_ratio"] - 0.8) > VERIFY_TOLERANCE  # the table's plan missed
    chosen = [r for r in rounds if r.get("chosen")]
    assert len(chosen) == 1 and abs(chosen[0]["measured_ratio"] - 0.8) <= VERIFY_TOLERANCE
    assert tuple(chosen[0]["widths"]) == tuple(report["widths_after"])

    def machine_ms(widths) -> float:
        return true_ms(conv_layers(plain_model(plain_specs(architecture(unpruned, tuple(widths))), SIZE, 10, False)))

    base = machine_ms([s.out_channels for s in WIDE])
    for r in rounds:
        assert r["agreed"] and r["measured_ratio"] == pytest.approx(machine_ms(r["widths"]) / base)
        assert r["unpruned_ms"] == pytest.approx(base)


def test_auto_provider_picks_the_fastest_runtime_that_runs_here(tiny, monkeypatch):
    """Two runtimes of ONNX files, one faked slow: `auto` takes the faster and says what each measured."""
    from compress.stages.prune import resolve_provider

    class Slow:
        label, opens = "Slow", "onnx"

        def unavailable(self, device="cpu", sample=None):
            return None

        def open(self, model, threads=None, device="cpu"):
            session = RUNTIMES["cpu"].open(model, threads, device)
            step = session.step

            def slowed(x):
                run = step(x)
                return lambda: (time.sleep(0.002), run())[1]

            session.step = slowed
            return session

    import compress.prune.measure as measure

    slow = Slow()
    monkeypatch.setitem(RUNTIMES, "slow", slow)  # added last and removed after: the others keep their order
    monkeypatch.setattr(measure, "RUNTIMES", {"cpu": RUNTIMES["cpu"], "slow": slow})  # the ones auto picks from
    options, choice = resolve_provider(LatencyOptions(provider="auto", threads=1, batch=2), tiny, SIZE)
    assert options.provider == "cpu" and choice["chosen"] == "cpu"
    assert set(choice["unpruned_ms"]) == {"cpu", "slow"} and choice["unpruned_ms"]["slow"] > 2
    same, none = resolve_provider(QUICK, tiny, SIZE)
    assert same is QUICK and none is None


def test_a_correction_below_the_floors_keeps_the_best_plan_measured(tmp_path):
    """Every plan measures 3x its prediction: the corrected budget soon falls below the narrowest widths the floors
    allow; the loop stops there and keeps the plan closest to the target, saying why it stopped."""
    from compress.prune import PruneOptions, Target, prune_model
    from compress.prune.cost import LatencyCost

    model = PlainRepVGG(SPECS, 10).eval()
    latency = LatencyOptions(threads=1, batch=2, cache_dir=tmp_path, verify=3)
    table = mac_table()
    cost = LatencyCost(table, model)

    measured, _ = faked(cost.cost(UNPRUNED), lambda w: 3.0 * cost.cost(w) / cost.cost(UNPRUNED))
    report = prune_model(model, PruneOptions(target=Target("keep_latency", 0.6), round_to=8, latency=latency),
                         torch.randn(1, 3, SIZE, SIZE), latency_table=table, measure=measured)
    rounds = report["latency"]["rounds"]
    assert "not reachable" in rounds[-1]["stopped"]
    chosen = [r for r in rounds if r.get("chosen")]
    assert len(chosen) == 1 and chosen[0]["measured_ratio"] == min(r["measured_ratio"] for r in rounds)
