"""The timing engine (`compress.timing`) on a faked clock: the alternation of jobs over rounds, one alive at a time,
warm-up calls left out, each round's fastest call and median kept, the quiet-round rule and its `max_rounds`, the
block-agreement rule, and the product's statistics (fastest call; median of same-round ratios).

Also the fakes other tests time with: `FakeClock` (a clock that moves only when a faked call costs time) and
`CostedRuntime` (a runtime of ONNX files whose every call costs what a hand-set cost model says, slowed at random
by "other work")."""

import weakref

import numpy as np
import onnx
import pytest

import compress.timing as timing
from compress.timing import (
    DISTURBED,
    QUIET_ROUNDS,
    Counts,
    SelfTimed,
    Series,
    block_ratios,
    ratio,
    ratio_of_rounds,
    round_ratios,
    run_rounds,
    time_calls,
    undisturbed,
    until_blocks_agree,
)


class FakeClock:
    """Seconds that pass only when a faked call spends them (`spend`)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def spend(self, ms: float) -> None:
        self.now += ms / 1000.0


def on_fake_clock(monkeypatch, clock: FakeClock) -> None:
    """Every call the engine times from now on is timed by `clock` (a host fact, faked: the product's code runs)."""
    real = timing.time_calls
    monkeypatch.setattr(timing, "time_calls", lambda step, warmup, iters, _clock=None: real(step, warmup, iters, clock))


def costing(clock: FakeClock, costs) -> timing.Step:
    """A step whose k-th call costs `costs[k]` ms on `clock`."""
    calls = iter(costs)
    return lambda: clock.spend(next(calls))


# ---- alternation, one job alive at a time -----------------------------------------------------------------------
class Alive:
    """What a job holds while open; the log checks no other is alive when one opens."""


def logging_jobs(names, log: list, clock: FakeClock, cost_ms: float = 1.0) -> dict:
    alive = weakref.WeakSet()

    def opener(name):
        def open_job():
            log.append((name, len(alive)))  # how many others were alive as this one opened
            held = Alive()
            alive.add(held)
            return {name: lambda: (held, clock.spend(cost_ms))}

        return open_job

    return {name: opener(name) for name in names}


def test_rounds_alternate_with_the_start_shifted_and_one_job_alive_at_a_time():
    clock, log = FakeClock(), []
    timed = run_rounds(logging_jobs("abc", log, clock), Counts(1, 2, 3), clock=clock)
    assert [name for name, _ in log] == list("abc" "bca" "cab")  # each round starts one job later
    assert {others for _, others in log} == {0}  # the job before was freed when the next one opened
    assert timed.rounds == 3 and all(s.rounds == [0, 1, 2] for s in timed.values())


def test_with_many_jobs_the_starts_spread_over_the_planned_rounds():
    clock, log = FakeClock(), []
    run_rounds(logging_jobs(range(9), log, clock), Counts(0, 1, 3), clock=clock)
    starts = [log[9 * r][0] for r in range(3)]
    assert starts == [0, 3, 6]  # 9 jobs over 3 rounds: each round starts a third of the way further


def test_warmup_calls_are_not_recorded():
    clock = FakeClock()
    step = costing(clock, [50.0, 40.0, 1.0, 2.0, 3.0])  # two slow warm-up calls, then three timed ones
    assert time_calls(step, 2, 3, clock) == pytest.approx([1.0, 2.0, 3.0])
    clock = FakeClock()
    costs = iter([[90.0, 3.0, 1.0, 2.0], [90.0, 5.0, 4.0, 6.0]])  # each round opens afresh: its warm-up again
    timed = run_rounds({"a": lambda: {"a": costing(clock, next(costs))}}, Counts(1, 3, 2), clock=clock)
    assert timed["a"].calls == [pytest.approx([3.0, 1.0, 2.0]), pytest.approx([5.0, 4.0, 6.0])]


def test_each_round_keeps_its_fastest_call_and_its_median():
    series = Series([[3.0, 1.0, 2.0], [5.0, 4.0, 6.0], [2.5, 9.0, 2.0]], [0, 1, 2])
    assert series.round_fastest == [1.0, 4.0, 2.0] and series.round_medians == [2.0, 5.0, 2.5]
    assert series.fastest == 1.0  # the product's latency: the fastest call of all
    assert series.median == 2.5  # recorded beside it: the median of the round medians


def test_a_step_that_times_itself_is_recorded_as_it_says():
    clock = FakeClock()
    step = SelfTimed(lambda: (clock.spend(500.0), 0.125)[1])  # a call of 500 ms, of which 125 ms count
    assert time_calls(step, 1, 2, clock) == [125.0, 125.0]


def test_two_jobs_giving_one_series_are_refused():
    clock = FakeClock()
    jobs = {k: (lambda: {"same": costing(clock, [1.0] * 9)}) for k in "ab"}
    with pytest.raises(ValueError, match="series 'same' given by two jobs"):
        run_rounds(jobs, Counts(0, 1, 1), clock=clock)


# ---- the quiet-round rule -----------------------------------------------------------------------------------------
def per_round_jobs(clock: FakeClock, ms_by_round: dict[str, list[float]], then: float = 1.0) -> dict:
    """Jobs whose every call in round r costs `ms_by_round[name][r]`, `then` after the list."""
    opened = {name: 0 for name in ms_by_round}

    def opener(name):
        def open_job():
            ms = (ms_by_round[name] + [then] * 100)[opened[name]]
            opened[name] += 1
            return {name: lambda: clock.spend(ms)}

        return open_job

    return {name: opener(name) for name in ms_by_round}


def test_undisturbed_rounds_are_those_within_disturbed_of_the_fastest():
    assert undisturbed([1.0, DISTURBED * 1.0, DISTURBED * 1.0 + 0.01, 3.0]) == [True, True, False, False]


def test_rounds_continue_until_every_series_has_quiet_rounds():
    clock = FakeClock()
    # a quiet first round, then four disturbed ones; the other job quiet throughout
    jobs = per_round_jobs(clock, {"a": [1.0, 2.0, 2.0, 2.0, 2.0], "b": []})
    timed = run_rounds(jobs, Counts(0, 2, 2, max_rounds=20), clock=clock)
    assert timed.rounds == 5 + QUIET_ROUNDS - 1  # b had enough after QUIET_ROUNDS; a waited for its quiet ones
    assert undisturbed(timed["a"].round_fastest) == [True] + [False] * 4 + [True] * (QUIET_ROUNDS - 1)


def test_rounds_stop_at_max_rounds_and_without_it_at_rounds():
    clock = FakeClock()
    timed = run_rounds(per_round_jobs(clock, {"a": [1.0]}, then=2.0), Counts(0, 1, 2, max_rounds=5), clock=clock)
    assert timed.rounds == 5  # disturbed for good: stopped at max_rounds
    timed = run_rounds(per_round_jobs(clock, {"a": [1.0]}, then=2.0), Counts(0, 1, 2), clock=clock)
    assert timed.rounds == 2  # no max_rounds: exactly `rounds`
    timed = run_rounds(per_round_jobs(clock, {"a": []}), Counts(0, 1, 1, max_rounds=9), clock=clock)
    assert timed.rounds == QUIET_ROUNDS  # quiet throughout: no round past the quiet ones


def test_blocks_of_rounds_continue_until_two_agree():
    clock = FakeClock()
    # the candidate slowed through the first block (ratio 1.0), then at its own 0.5 ratio
    jobs = per_round_jobs(clock, {"ref": [1.0] * 10, "cand": [1.0, 1.0]}, then=0.5)
    more = until_blocks_agree(["cand"], "ref", block=2, tolerance=0.02)
    timed = run_rounds(jobs, Counts(0, 1, 2, max_rounds=8), more=more, clock=clock)
    assert timed.rounds == 6  # blocks 1 and 2 disagree (1.0 vs 0.5), 2 and 3 agree
    assert [b[0] for b in block_ratios(timed, ["cand"], "ref", 2)] == pytest.approx([1.0, 0.5, 0.5])


# ---- the product's ratio --------------------------------------------------------------------------------------------
def test_the_ratio_is_the_median_of_same_round_ratios_of_fastest_calls():
    # the numerator's rounds: fastest 1.0, 1.5, 1.1 (their medians far higher); the denominator's 2.0 in each
    num = Series([[1.0, 9.0, 9.0], [1.5, 9.0, 9.0], [1.1, 9.0, 9.0]], [0, 1, 2])
    den = Series([[2.0, 2.0, 2.0]] * 3, [0, 1, 2])
    assert round_ratios(num, den) == pytest.approx([0.5, 0.75, 0.55])
    assert ratio(num, den) == pytest.approx(0.55)  # not fastest / fastest (0.5), nor of the medians (4.5)
    assert ratio_of_rounds(num.round_fastest, den.round_fastest) == pytest.approx(0.55)  # from stored results


def test_the_ratio_pairs_rounds_by_index():
    num = Series([[1.0], [3.0]], [1, 2])  # timed again in rounds 1 and 2 only
    den = Series([[2.0], [2.0], [4.0]], [0, 1, 2])
    assert round_ratios(num, den) == pytest.approx([0.5, 0.75])
    with pytest.raises(ValueError, match="same rounds"):
        ratio_of_rounds([1.0, 2.0], [1.0])


def test_counts_are_checked():
    with pytest.raises(ValueError, match="max_rounds=2 is below rounds=3"):
        Counts(1, 1, 3, max_rounds=2)
    with pytest.raises(ValueError, match="iters=0"):
        Counts(1, 0, 3)


# ---- a runtime whose calls cost what a hand-set model says --------------------------------------------------------
def conv_layers(model: onnx.ModelProto) -> list[tuple[int, int, int]]:
    """(in channels, out channels, output size) of each Conv of a plain stack's ONNX graph, in order."""
    weights = {init.name: init.dims for init in model.graph.initializer}
    size = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    layers = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            out, cin_per_group = weights[node.input[1]][:2]
            attrs = {a.name: a for a in node.attribute}
            stride = attrs["strides"].ints[0]
            groups = attrs["group"].i if "group" in attrs else 1
            size = (size - 1) // stride + 1
            layers.append((cin_per_group * groups, out, size))
    return layers


class CostedSession:
    """An opened ONNX file whose every call spends `ms` on the fake clock; a fresh session's first call `cold`
    times it; each call slowed `burst` times by other work with probability `busy`."""

    timing = "faked: hand-set cost model"

    def __init__(self, ms: float, clock: FakeClock, rng: np.random.Generator, busy: float, burst: float,
                 cold: float):
        self.ms, self.clock, self.rng, self.busy, self.burst, self.cold = ms, clock, rng, busy, burst, cold

    def step(self, x: np.ndarray):
        first = [True]

        def call():
            slowed = self.burst if self.rng.random() < self.busy else 1.0
            self.clock.spend(self.ms * slowed * (self.cold if first[0] else 1.0))
            first[0] = False

        return call


class CostedRuntime:
    """A runtime of ONNX files (registered in a test) whose calls cost `cost(conv_layers(model))` ms on `clock`,
    with bursts of other work (see CostedSession); `opened` lists the files' stems in order."""

    label, opens = "Costed", "onnx"

    def __init__(self, name: str, clock: FakeClock, cost, busy: float = 0.3, burst: float = 3.0, cold: float = 10.0,
                 seed: int = 0):
        self.name, self.clock, self.cost = name, clock, cost
        self.busy, self.burst, self.cold = busy, burst, cold
        self.rng, self.opened = np.random.default_rng(seed), []

    def unavailable(self, device="cpu", sample=None):
        return None

    def version(self):
        return "costed 1"

    def open(self, model, threads=None, device="cpu"):
        self.opened.append(model.stem)
        ms = self.cost(conv_layers(onnx.load(str(model))))
        return CostedSession(ms, self.clock, self.rng, self.busy, self.burst, self.cold)


def test_conv_layers_reads_widths_and_sizes_of_a_plain_graph():
    from compress.prune.onnx_layers import layer_model, plain_model
    from repvgg import LayerSpec

    specs = [LayerSpec(3, 8, 2), LayerSpec(8, 16, 1), LayerSpec(16, 24, 2)]
    assert conv_layers(plain_model(specs, 16, 10, False)) == [(3, 8, 8), (8, 16, 8), (16, 24, 4)]
    assert conv_layers(layer_model(LayerSpec(16, 24, 2), 8, False, False)) == [(16, 24, 4)]
